"""The files the guest is made of, found through the installed package.

``guest/`` in the source tree is the package ``pytest_vmfork.guest`` (pyproject.toml
maps it; its subpackage ``vmfork_agent`` holds the agent's modules), so a wheel, an
sdist and an editable checkout all ship exactly one copy of the agent and the init
scripts. The guest also runs host modules, shared byte for byte: the mailbox codec,
the channel's framing, the tree writer and the generated protobuf code. These files,
and nothing else of the package, shape the image key.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from pytest_vmfork.errors import ImageBuildError

GUEST_PACKAGE = "pytest_vmfork.guest"
#: Modules of pytest_vmfork that the guest imports, relative to the package.
SHARED_MODULES = ("mailbox.py", "channel.py", "tree.py", "proto/agent_pb2.py")
#: The agent's package (guest/vmfork_agent/), installed beside its entry agent.py in the image.
AGENT_PACKAGE = "vmfork_agent"
#: Guest files the image builder needs; a package without them is broken.
REQUIRED = ("agent.py", f"{AGENT_PACKAGE}/__init__.py", f"{AGENT_PACKAGE}/server.py", "inittab", "rc.sh",
            "initramfs-init.sh", "vmfork-ack", "fetch-kernel.sh")


def _walk(node: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found = []
    for child in node.iterdir():
        if child.name == "__pycache__" or child.name.endswith(".pyc"):
            continue
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            found += _walk(child, rel + "/")
        elif child.is_file():
            found.append((rel, child))
    return found


def guest_files() -> dict[str, bytes]:
    """Every file of the ``pytest_vmfork.guest`` package, by relative path."""
    try:
        root = resources.files(GUEST_PACKAGE)
    except ModuleNotFoundError as exc:
        raise ImageBuildError(
            f"the package {GUEST_PACKAGE} is missing from this pytest-vmfork install; "
            "reinstall it (pip install --force-reinstall pytest-vmfork)"
        ) from exc
    files = {rel: node.read_bytes() for rel, node in _walk(root)}
    if missing := [name for name in REQUIRED if name not in files]:
        raise ImageBuildError(
            f"{GUEST_PACKAGE} lacks {', '.join(missing)} (looked in {root}); this pytest-vmfork "
            "install is incomplete: reinstall it (pip install --force-reinstall pytest-vmfork)"
        )
    return files


def shared_modules() -> dict[str, bytes]:
    """The host modules the guest imports, by path relative to ``pytest_vmfork``."""
    pkg = resources.files("pytest_vmfork")
    out = {}
    for rel in SHARED_MODULES:
        node = pkg.joinpath(*rel.split("/"))
        if not node.is_file():
            raise ImageBuildError(f"pytest_vmfork/{rel} is missing from this install; reinstall pytest-vmfork")
        out[rel] = node.read_bytes()
    return out


def key_sources() -> dict[str, bytes]:
    """Everything of the package that goes into the guest, as ``guest/...`` and ``pytest_vmfork/...``."""
    return {**{f"guest/{k}": v for k, v in guest_files().items()},
            **{f"pytest_vmfork/{k}": v for k, v in shared_modules().items()}}
