"""The package's shape: layers whose imports point down, no cycle, no private name
used across modules, no module too long to hold one concept (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pytest_vmfork"
GUEST = PACKAGE.parent / "guest"
#: A module longer than this holds more than one concept; split it.
MAX_LINES = 500
#: Each subpackage's rank: a module may import ranks below its own and its own
#: subpackage (without a cycle), never a sibling of the same rank or anything above.
RANKS = {
    "": 0,  # the bottom: errors, config (settings), mailbox, channel, tree, proto
    "host": 1,
    "net": 2,
    "build": 2,
    "vm": 3,
    "janitor": 4,
    "plugin": 5,
    "cli": 5,
}
GENERATED = {"proto/agent_pb2.py"}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``vm.fork``; ``plugin`` for plugin/__init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() in GENERATED:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts) or "__init__"] = path
    return found


def package_of(module: str) -> str:
    """The subpackage a module belongs to ('' for the bottom layer)."""
    head = module.split(".")[0]
    return head if head in RANKS and "." in module or module in RANKS else ""


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported from pytest_vmfork, names taken from it, line) for every import, lazy ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pytest_vmfork" or node.module.startswith("pytest_vmfork."):
                base = node.module.removeprefix("pytest_vmfork").lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists() or \
                            (PACKAGE / sub.replace(".", "/") / "__init__.py").exists():
                        out.append((sub, [], node.lineno))
                    else:
                        out.append((base or "__init__", [alias.name], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; import by absolute name")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pytest_vmfork."):
                    out.append((alias.name.removeprefix("pytest_vmfork."), [], node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges[name] = set()
        for target, _names, _line in imports(path):
            if target.startswith("proto"):
                continue
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name:
                edges[name].add(target)
    return edges


def test_every_import_points_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        if name == "__init__":
            continue  # the public facade re-exports from every layer
        mine = package_of(name)
        for target in targets:
            theirs = package_of(target)
            if target == "__init__":
                wrong.append(f"{name} imports the facade pytest_vmfork; import the module that defines the name")
            elif theirs != mine and RANKS[theirs] >= RANKS[mine]:
                wrong.append(f"{name} ({mine or 'bottom'}) imports {target} ({theirs or 'bottom'})")
    assert not wrong, "imports pointing up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_is_used_across_modules():
    mods = modules()
    used = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, line in imports(path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    used.append(f"{name}:{line} imports {target}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pytest_vmfork"):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("pytest_vmfork"):
                        aliases[alias.asname or alias.name] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                used.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not used, "private names used across modules:\n" + "\n".join(used)


def private_names_defined(tree: ast.AST) -> set[str]:
    """Private attributes and methods a module defines: ``def _x``, ``self._x = ``, ``_x: T`` in a class."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_object_is_reached_into_from_another_module():
    """``vm._agent`` in another module is a reach into the object's internals: call its public methods."""
    reached = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        own = private_names_defined(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and node.attr not in own and not (isinstance(node.value, ast.Name)
                                                       and node.value.id in ("self", "cls", "sys", "os"))):
                reached.append(f"{name}:{node.lineno} uses .{node.attr}, defined elsewhere")
    assert not reached, "private attributes used from another module:\n" + "\n".join(reached)


def hand_written(path: Path) -> bool:
    return path.relative_to(PACKAGE.parent).as_posix().removeprefix("pytest_vmfork/") not in GENERATED


@pytest.mark.parametrize("path", sorted(p for p in [*PACKAGE.rglob("*.py"), *GUEST.rglob("*.py")] if hand_written(p)),
                         ids=lambda p: p.relative_to(PACKAGE.parent).as_posix())
def test_no_module_is_longer_than_one_concept_needs(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (over {MAX_LINES}): split it by concept"


def test_every_subpackage_says_what_it_is_and_what_it_may_import():
    for sub in RANKS:
        if not sub:
            continue
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc, f"pytest_vmfork/{sub}/__init__.py has no docstring"
        if sub not in ("plugin", "cli"):
            assert "May import" in doc, f"pytest_vmfork/{sub}/__init__.py does not say what it may import"


def test_the_architecture_page_lists_every_module_and_no_missing_one():
    """docs/architecture.md's module table is the map a newcomer reads first: it must
    name every module that exists and nothing that does not."""
    import re

    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page[page.index("### Modules"):page.index("### What moved where")]
    listed = set(re.findall(r"^\| [a-z]+ \| `([a-z_/]+(?:\.py)?/?)` \|", table, re.M))
    on_disk = {
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__main__.py" and p.parent.name != "proto"
        and not (p.name == "__init__.py" and len(ast.parse(p.read_text()).body) <= 1)  # a docstring
        and p != PACKAGE / "__init__.py"  # the public names, re-exported
    } | {"proto/"}
    assert sorted(on_disk - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - on_disk) == [], "docs/architecture.md lists modules that do not exist"
