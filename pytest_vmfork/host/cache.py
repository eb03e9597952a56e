"""The cache as a whole: what is in it and when each entry was last used.

The cache directory holds three kinds of content-keyed entries, each a directory
``<kind dir>/<key>/`` next to its build lock ``<key>.lock``:

- ``roots/``: mmdebstrap's Debian root for one package set (used to build images);
- ``images/``: a kernel, initramfs and ext4 root (``manifest.json`` names its root);
- ``snapshots/``: a template's snapshot, a layer (``vmfork_layer``, ``vm.snapshot()``)
  or a kept VM (``--vmfork-keep-failed``); ``manifest.json`` names its image.

Every cache hit calls :func:`record_use`, which writes the time into a stamp file
beside the entry (``<key>.used``; the time is the file's *content*, so a cache copied
without its timestamps keeps it) and takes a shared ``flock`` on that stamp for the
rest of the process. No fsync, and at most twice per entry and process (its lookup
and its first fork, never every fork). The shared lock is the liveness record: it
vanishes with the process however it dies, so a run that crashed never pins an
entry, and a prune (:mod:`pytest_vmfork.janitor.prune`, which removes stale entries)
can tell exactly which entries a live run uses (its exclusive try fails).
:func:`list_entries` lists the entries, least recently used first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_vmfork.errors import ConfigError

KINDS_DIRS = {"root": "roots", "image": "images", "snapshot": "snapshots"}
STAMP_SUFFIX = ".used"
#: How long :func:`record_use` waits for a prune that holds an entry's stamp
#: (it holds it only while renaming the entry aside: milliseconds).
USE_WAIT_S = 5.0

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_AGE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_FORMS = "a number of bytes or one with a unit K, M, G or T (powers of 1024), e.g. 500M or 10G"
_AGE_FORMS = "a number with a unit s, m, h, d or w, e.g. 90m, 12h, 30d or 2w"


# --- values -------------------------------------------------------------------


def parse_size(text: Any, what: str = "size") -> int:
    """``"10G"`` -> bytes (K/M/G/T are powers of 1024; ``10GiB``, ``10GB`` and ``10g`` too)."""
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a size: use {_SIZE_FORMS}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_age(text: Any, what: str = "age") -> float:
    """``"30d"`` -> seconds."""
    m = _AGE_RE.fullmatch(str(text))
    if not m:
        raise ConfigError(f"{what} {text!r} is not a duration: use {_AGE_FORMS}")
    return float(m.group(1)) * _AGE_UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


# --- last use -----------------------------------------------------------------

_held: dict[str, int] = {}  # stamp path -> fd holding a shared flock for this process
_held_lock = threading.Lock()


def stamp_path(entry: Path) -> Path:
    """The last-use stamp of cache entry ``entry`` (beside it, not in it: an
    entry's directory is sealed and verified as a whole)."""
    return entry.parent / (entry.name + STAMP_SUFFIX)


def record_use(entry: Path | str, *, now: float | None = None) -> bool:
    """Record that this process uses cache entry ``entry``, and keep it from being
    pruned while this process lives. Returns False if the entry is gone (a prune
    removed it just now): the caller treats that as a cache miss.

    Cheap enough for every cache hit: the first call per entry opens and locks the
    stamp, every call writes 21 bytes into it; no fsync (a lost last-use time only
    makes an entry look older)."""
    entry = Path(entry)
    stamp = stamp_path(entry)
    data = b"%20.3f\n" % (time.time() if now is None else now)
    with _held_lock:
        fd = _held.get(str(stamp))
        if fd is None:
            fd = _hold(entry, stamp)
            if fd is None:
                return False
            if fd < 0:  # a read-only cache: nothing to record, nothing can prune it either
                return True
            _held[str(stamp)] = fd
        with contextlib.suppress(OSError):
            os.pwrite(fd, data, 0)
    return True


def _hold(entry: Path, stamp: Path) -> int | None:
    """An fd with a shared lock on ``entry``'s current stamp; None if the entry is
    gone, -1 if the stamp cannot be written (read-only cache)."""
    deadline = time.monotonic() + USE_WAIT_S
    while True:
        try:
            fd = os.open(stamp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError:
            return -1 if entry.is_dir() else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a prune is renaming the entry aside right now
            os.close(fd)
            if time.monotonic() > deadline:
                return None  # the caller rebuilds: a defined fallback, never a broken run
            time.sleep(0.02)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(stamp).st_ino
        except FileNotFoundError:
            same = False
        if same and entry.is_dir():
            return fd
        os.close(fd)
        if not entry.is_dir():
            return None
        # the stamp was replaced (a prune unlinked it, a build made a new entry): again


def release_all() -> None:
    """Drop this process's holds (the process's exit does the same)."""
    with _held_lock:
        for fd in _held.values():
            os.close(fd)
        _held.clear()


def _read_stamp(stamp: Path) -> float | None:
    try:
        text = stamp.read_bytes()[:64].strip()
        return float(text) if text else stamp.stat().st_mtime
    except (OSError, ValueError):
        return None


# --- entries ------------------------------------------------------------------


@dataclass
class CacheEntry:
    """One cache entry: a Debian root, an image or a snapshot (template, layer or kept VM)."""

    kind: str  # root, image, snapshot, layer, kept
    key: str
    path: Path
    disk_bytes: int  # blocks on disk (RAM files are sparse); an inode shared with an entry listed earlier counts once
    used: float  # last use (its own, or a dependant's if later)
    what: str
    parent: str | None = None  # the key of what it depends on: a snapshot's image, an image's root
    created: float = 0.0

    @property
    def kind_dir(self) -> str:
        return KINDS_DIRS["root" if self.kind == "root" else "image" if self.kind == "image" else "snapshot"]


def _json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _disk_bytes(path: Path, seen: set[tuple[int, int]]) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                continue
            seen.add(ident)
            total += st.st_blocks * 512
    return total


def _describe_packages(spec: dict[str, Any]) -> str:
    packages = spec.get("packages") or []
    parts = [f"kernel {spec.get('kernel_flavour', '?')}",
             "packages " + " ".join(packages[:6]) + (" ..." if len(packages) > 6 else "") if packages
             else "base packages"]
    if spec.get("files"):
        parts.append(f"{len(spec['files'])} files")
    return ", ".join(parts)


def _snapshot_entry(path: Path, doc: dict[str, Any], seen: set[tuple[int, int]]) -> CacheEntry:
    kept = doc.get("kept") if isinstance(doc.get("kept"), dict) else None
    depth = int(doc.get("depth", 0) or 0)
    machine = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    if kept is not None:
        kind, what = "kept", f"kept VM {doc.get('name')} of {kept.get('test', '?')}"
    elif depth:
        label = doc.get("layer") or doc.get("name") or "vm.snapshot()"
        kind, what = "layer", f"layer {label}, depth {depth}" + (" (this run only)" if doc.get("ephemeral") else "")
    else:
        kind = "snapshot"
        what = doc.get("description") or f"{machine.get('memory_mib', '?')} MiB, {machine.get('vcpus', '?')} vCPU"
        what = f"template: {what}"
    return CacheEntry(kind, path.name, path, _disk_bytes(path, seen), 0.0, str(what),
                      parent=doc.get("image_key"), created=float(doc.get("created", 0) or 0))


def list_entries(cache_dir: Path | str) -> list[CacheEntry]:
    """Every complete entry in the cache, least recently used first.

    An image counts as used when any of its snapshots was, a root when any of its
    images was, so a dependency never looks older than what needs it."""
    cache = Path(cache_dir).expanduser()
    seen: set[tuple[int, int]] = set()  # roots first: an image's kernel files are hard links to its root's
    found: list[CacheEntry] = []
    for kind, sub in KINDS_DIRS.items():
        folder = cache / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or path.is_symlink():
                continue
            if kind == "root":
                doc = _json(path / "root.json")
                if not doc:
                    continue
                entry = CacheEntry("root", path.name, path, _disk_bytes(path, seen), 0.0,
                                   "Debian root: " + _describe_packages(doc.get("spec") or {}))
            elif kind == "image":
                doc = _json(path / "manifest.json")
                if not doc:
                    continue
                entry = CacheEntry("image", path.name, path, _disk_bytes(path, seen), 0.0,
                                   "image: " + _describe_packages(doc.get("spec") or {}), parent=doc.get("root_key"))
            else:
                doc = _json(path / "manifest.json")
                if not doc:
                    continue
                entry = _snapshot_entry(path, doc, seen)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            entry.created = entry.created or mtime
            entry.used = _read_stamp(stamp_path(path)) or entry.created
            found.append(entry)
    by_key = {(e.kind_dir, e.key): e for e in found}
    for child_kind, parent_dir in (("snapshot", "images"), ("image", "roots")):
        for e in found:
            if e.kind_dir == KINDS_DIRS[child_kind] and e.parent and (parent := by_key.get((parent_dir, e.parent))):
                parent.used = max(parent.used, e.used)
    return sorted(found, key=lambda e: (e.used, _RANK[e.kind]))


_RANK = {"kept": 0, "layer": 0, "snapshot": 1, "image": 2, "root": 3}  # dependants go first


def format_entries(entries: list[CacheEntry], *, now: float | None = None) -> str:
    """The ``vmfork cache`` table, most recently used first."""
    now = time.time() if now is None else now
    rows = [("KIND", "KEY", "SIZE", "LAST USED", "WHAT")]
    for e in sorted(entries, key=lambda e: -e.used):
        rows.append((e.kind, e.key[:24], format_size(e.disk_bytes), format_age(now - e.used), e.what))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths)), r[4]]).rstrip() for r in rows]
    lines.append(f"{len(entries)} entries, {format_size(sum(e.disk_bytes for e in entries))} on disk")
    return "\n".join(lines)
