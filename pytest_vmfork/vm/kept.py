"""Kept VMs: a failed test's fork, saved as a snapshot you can step into later.

With ``--vmfork-keep-failed`` the plugin saves a failed test's running fork
with ``vm.snapshot()`` under a key derived from the test id (a later failure of
the same test replaces it), stops it, and prints how to reach it. Nothing of it
runs after the session: ``vmfork exec NAME -- argv`` forks it again, runs one
command and tears the fork down; ``vmfork kept`` lists them; ``vmfork gc
--kept`` removes them. They live in the snapshot cache, marked ``kept`` in
their manifest (test id, run, time), apart from the run directories.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host import private
from pytest_vmfork.vm.snapshot import MANIFEST, Snapshot, record_use

KEY_PREFIX = "kept_"
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


def identity(nodeid: str, index: int = 0) -> tuple[str, str]:
    """(cache key, short name) of the ``index``-th VM of test ``nodeid``: stable, so a
    test that fails again replaces its kept VM instead of piling up copies."""
    digest = hashlib.sha256(f"{nodeid}\0{index}".encode()).hexdigest()
    test = nodeid.rsplit("::", 1)[-1]
    slug = _SLUG.sub("-", test).strip("-")[:60] or "test"
    name = f"{slug}-{digest[:6]}" + (f"-{index + 1}" if index else "")
    return KEY_PREFIX + digest[:19], name


@dataclass(frozen=True)
class KeptVM:
    name: str
    key: str
    test: str
    created: float
    disk_bytes: int
    dir: Path


def list_kept(cache_dir: Path) -> list[KeptVM]:
    """Every kept VM in the cache, oldest first."""
    found = []
    for manifest in sorted((Path(cache_dir) / "snapshots").glob(f"{KEY_PREFIX}*/{MANIFEST}")):
        try:
            doc: dict[str, Any] = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc.get("kept"), dict):
            continue
        entry = manifest.parent
        disk = sum(p.stat().st_blocks * 512 for p in entry.iterdir() if p.is_file())
        found.append(KeptVM(name=str(doc.get("name")), key=entry.name, test=str(doc["kept"].get("test", "?")),
                            created=float(doc.get("created", 0.0)), disk_bytes=disk, dir=entry))
    return sorted(found, key=lambda k: k.created)


def find_kept(cache_dir: Path, name: str, *, ram_gid: int | None = None) -> Snapshot:
    """The kept VM called ``name`` (its short name or its key), loaded and verified
    (``ram_gid``: the QEMU user's group, which may write its RAM file: ``Run.qemu().ram_gid``)."""
    kept = list_kept(cache_dir)
    for k in kept:
        if name in (k.name, k.key):
            private.verify_cache_entry(k.dir, ram_gid=ram_gid)  # never restore what someone else could have written
            snap = Snapshot.load(k.dir)
            record_use(snap)
            return snap
    have = ", ".join(k.name for k in kept) or "none (run pytest with --vmfork-keep-failed)"
    raise ConfigError(f"no kept VM named {name!r} in {cache_dir}; kept VMs: {have}")
