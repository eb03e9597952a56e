"""Every example in README.md and docs/*.md runs, exactly as written; the README has
the shape a user reads first.

An example is a fenced block right after a line ``<!-- example: NAME -->`` (see
tests/examples.py). Blocks sharing a NAME form one project in a fresh directory: its
test files run as one pytest session (real VMs), then its scripts and shell lines,
each of which must exit 0. A project without a conftest.py of its own gets the one of
the ``project`` example, as the documents' text says.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.examples import DOCUMENTS, README, REPO, examples, examples_in
from tests.plugin.suites import finish

BIN = Path(sys.executable).parent
TIMEOUT_S = 1500.0
EXAMPLES = examples()

#: The README's sections, in the order a new user needs them (issue #21).
README_SECTIONS = ("Quickstart", "Fixtures", "`Template` fields", "The VM API", "Markers", "Options",
                   "How fast", "CI", "Troubleshooting", "Develop")
README_MAX_LINES = 450


def test_readme_has_examples_and_every_one_names_a_known_kind() -> None:
    assert {"intro", "project", "mailboxes", "script"} <= set(EXAMPLES)
    assert {"several-templates", "layers", "files", "qemu-user"} <= set(EXAMPLES)  # in docs/
    for name, blocks in EXAMPLES.items():
        for label, _ in blocks:
            assert label == "shell" or re.fullmatch(r"[\w-]+(/[\w-]+)*\.py", label), (name, label)


def test_the_project_example_is_the_user_project_ci_runs_as_a_non_root_user() -> None:
    files = {label: text for label, text in EXAMPLES["project"] if label != "shell"}
    assert set(files) == {"conftest.py", "test_service.py"}
    for label, text in files.items():  # the same text but for the line naming the file
        assert (REPO / "fixtures/userproject" / label).read_text() == text.partition("\n")[2], label


def test_every_option_is_in_the_readme_options_table_with_its_environment_variable() -> None:
    from pytest_vmfork.plugin.options import OPTIONS

    text = README.read_text()
    for opt in OPTIONS:
        env = f" `{opt.env}` " if opt.env else " "
        assert f"| `{opt.flag}` | `{opt.name}` |{env}|" in text, opt.flag


def test_the_readme_is_short_and_has_its_sections_in_order() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"
    sections = [line[3:] for line in lines if line.startswith("## ")]
    assert sections == list(README_SECTIONS), sections
    fast = lines[lines.index("## How fast"):lines.index("## CI")]
    assert 3 <= sum(line.startswith("|") for line in fast) <= 8, "the How fast table has at most 8 lines"


def test_the_readme_renders_on_a_package_index_without_relative_links() -> None:
    """The README is the package's long description: a relative link or image would be
    broken there, so documents are named as paths and links are absolute."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img[^>]+src=[\"']([^\"']+)", text)
    relative = [t for t in targets if not re.match(r"https?://", t)]
    assert not relative, relative


def test_every_document_the_readme_names_exists() -> None:
    named = set(re.findall(r"`((?:docs/[\w.-]+\.md)|CHANGELOG\.md)`", README.read_text()))
    assert "docs/performance.md" in named
    for path in named:
        assert (REPO / path).is_file(), path
    assert {REPO / p for p in named if p.startswith("docs/")} <= set(DOCUMENTS)


#: Examples with a runner of their own (an environment they need): docs/kernel.md's and
#: the README's kernel example (tests/test_docs_kernel.py hands them a kernel build tree).
OWN_RUNNER = {*examples_in(REPO / "docs" / "kernel.md"), "own-kernel"}


@pytest.mark.vm
@pytest.mark.parametrize("name", sorted(set(EXAMPLES) - OWN_RUNNER))
def test_documented_example_runs_as_written(name: str, tmp_path: Path) -> None:
    run_example(f"example {name!r}", EXAMPLES[name], tmp_path)


def run_example(what: str, blocks: list[tuple[str, str]], tmp_path: Path,
                env: dict[str, str] | None = None) -> None:
    """Write an example's files into ``tmp_path``, run its tests as one pytest session (real
    VMs), then its scripts and shell lines; each must pass. An example with tests and no
    conftest.py of its own gets the ``project`` example's; ``env`` is added to the inner
    runs' environment."""
    files = {label: text for label, text in blocks if label != "shell"}
    tests = [label for label in files if Path(label).name.startswith("test_")]
    if "conftest.py" not in files and tests:
        files["conftest.py"] = dict(EXAMPLES["project"])["conftest.py"]
    for label, text in files.items():
        (tmp_path / label).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / label).write_text(text)
    env = {**os.environ, **(env or {}), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
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
