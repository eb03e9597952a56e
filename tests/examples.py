"""The examples of README.md and docs/*.md, as the tests that run them read them.

An example is a fenced block right after a line ``<!-- example: NAME -->``; its first
line is a comment naming its file (``# conftest.py``, ``# test_x.py``, ``# script.py``)
or ``# shell`` for commands. Blocks sharing a NAME form one project; a NAME belongs to
one document.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: Every document whose examples run in tests: the README first, then docs/ by name.
DOCUMENTS = (README, *sorted((REPO / "docs").glob("*.md")))
BLOCK = re.compile(r"^<!-- example: (?P<name>[\w-]+) -->\n```(?P<lang>\w*)\n(?P<body>.*?)^```$",
                   re.MULTILINE | re.DOTALL)


def examples(documents: tuple[Path, ...] = DOCUMENTS) -> dict[str, list[tuple[str, str]]]:
    """NAME -> [(file name or "shell", text)] in document order. A file's text is the
    whole block (its first line names it); a shell block's text is its commands."""
    found: dict[str, list[tuple[str, str]]] = {}
    owner: dict[str, Path] = {}
    for doc in documents:
        for m in BLOCK.finditer(doc.read_text()):
            name = m["name"]
            if owner.setdefault(name, doc) != doc:
                raise AssertionError(f"example {name!r} is in both {owner[name].name} and {doc.name}: "
                                     "give one of them another name")
            first, _, rest = m["body"].partition("\n")
            label = first.removeprefix("#").strip()
            if not (first.startswith("# ") and label):
                raise AssertionError(f"{doc.name}: example {name!r}: first line must name its file: {first!r}")
            found.setdefault(name, []).append((label, rest if label == "shell" else m["body"]))
    return found


def examples_in(doc: Path) -> dict[str, list[tuple[str, str]]]:
    """The examples of one document."""
    return examples((doc,))


def example_files(name: str) -> dict[str, str]:
    """The files (not shell lines) of example NAME, by the file name their first line gives."""
    blocks = examples().get(name)
    if not blocks:
        raise AssertionError(f"no document has an example {name!r}")
    return {label: text for label, text in blocks if label != "shell"}
