"""Every example in README.md runs, exactly as written.

An example is a fenced block right after a line ``<!-- example: NAME -->``; its first
line is a comment naming its file (``# conftest.py``, ``# test_x.py``, ``# script.py``)
or ``# shell`` for commands. Blocks sharing a NAME form one project in a fresh
directory: its test files run as one pytest session (real VMs), then its scripts and
shell lines, each of which must exit 0. A project without a conftest.py of its own
gets the one of the ``project`` example, as the README's text says.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.plugin.suites import finish

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"^<!-- example: (?P<name>[\w-]+) -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```$",
                   re.MULTILINE | re.DOTALL)
BIN = Path(sys.executable).parent
TIMEOUT_S = 1500.0


def examples(doc: Path = README) -> dict[str, list[tuple[str, str]]]:
    """NAME -> [(file name or "shell", text)] in the order of ``doc`` (README.md)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for m in BLOCK.finditer(doc.read_text()):
        first, _, rest = m["body"].partition("\n")
        label = first.removeprefix("#").strip()
        assert first.startswith("# ") and label, f"example {m['name']!r}: first line must name its file: {first!r}"
        found.setdefault(m["name"], []).append((label, rest if label == "shell" else m["body"]))
    return found


EXAMPLES = examples()


def test_readme_has_examples_and_every_one_names_a_known_kind() -> None:
    assert {"intro", "project", "mailboxes", "script"} <= set(EXAMPLES)
    for name, blocks in EXAMPLES.items():
        for label, _ in blocks:
            assert label == "shell" or re.fullmatch(r"[\w-]+(/[\w-]+)*\.py", label), (name, label)


def test_the_project_example_is_the_user_project_ci_runs_as_a_non_root_user() -> None:
    files = {label: text for label, text in EXAMPLES["project"] if label != "shell"}
    assert set(files) == {"conftest.py", "test_service.py"}
    for label, text in files.items():  # the same text but for the line naming the file
        assert (REPO / "fixtures/userproject" / label).read_text() == text.partition("\n")[2], label


def test_every_option_is_in_the_readme_options_table() -> None:
    from pytest_vmfork.config import OPTIONS

    text = README.read_text()
    for opt in OPTIONS:
        assert f"| `{opt.flag}` | `{opt.name}` |" in text, opt.flag


@pytest.mark.vm
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs_as_written(name: str, tmp_path: Path) -> None:
    run_example(f"README example {name!r}", EXAMPLES[name], tmp_path, dict(EXAMPLES["project"])["conftest.py"])


def run_example(what: str, blocks: list[tuple[str, str]], tmp_path: Path, conftest: str | None = None,
                env: dict[str, str] | None = None) -> None:
    """Write an example's files into ``tmp_path``, run its tests as one pytest session (real
    VMs), then its scripts and shell lines; each must pass. ``conftest`` is used by an example
    with tests and no conftest.py of its own; ``env`` is added to the inner runs' environment."""
    files = {label: text for label, text in blocks if label != "shell"}
    tests = [label for label in files if Path(label).name.startswith("test_")]
    if "conftest.py" not in files and tests and conftest is not None:
        files["conftest.py"] = conftest
    for label, text in files.items():
        (tmp_path / label).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / label).write_text(text)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    if tests:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0"],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        code, out = finish(proc, TIMEOUT_S)
        assert code == 0, f"{what} failed:\n{out[-6000:]}"
        assert re.search(r"\d+ passed", out) and "failed" not in out.splitlines()[-1], out[-3000:]
    for label, text in blocks:
        if label.endswith(".py") and label not in tests and Path(label).name != "conftest.py":
            commands = [[sys.executable, label]]
        elif label == "shell":
            commands = [shlex.split(line) for line in text.splitlines() if line.strip()]
        else:
            continue
        for argv in commands:
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            code, out = finish(proc, TIMEOUT_S)
            assert code == 0, f"{what}: {shlex.join(argv)} exited {code}:\n{out[-4000:]}"
