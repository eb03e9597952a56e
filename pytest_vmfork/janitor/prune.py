"""Prunes the cache: removes entries no live process uses (:mod:`pytest_vmfork.host.cache`
keeps the entries and their last use). Nothing else removes a stale entry, so every
edit of a template would leave its old image, root and snapshot behind.

:func:`prune` removes, least recently used first, entries older than a cut-off or
beyond a size cap, plus entries whose dependants are gone (a root no image uses, a
snapshot whose image is gone). It takes the entry's build lock and the stamp's
exclusive lock without waiting: what is being built or used is skipped and
reported, never broken. An entry is renamed aside before it is deleted, so a
reader never sees half of one. Works without pytest (``vmfork cache prune``); the
plugin only calls :func:`enforce_max_size` at the end of a run.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from pytest_vmfork.host.cache import (
    KINDS_DIRS,
    STAMP_SUFFIX,
    CacheEntry,
    format_age,
    format_size,
    list_entries,
    stamp_path,
)


@dataclass(frozen=True)
class PruneItem:
    """One entry a prune removed (or would) or left alone, and why."""

    entry: CacheEntry
    reason: str


@dataclass
class PruneReport:
    """What :func:`prune` removed (or would, ``dry_run``) and what it left alone."""

    dry_run: bool = False
    removed: list[PruneItem] = field(default_factory=list)
    skipped: list[PruneItem] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0

    @property
    def freed(self) -> int:
        return sum(i.entry.disk_bytes for i in self.removed)

    def summary(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        line = (f"vmfork cache: {verb} {format_size(self.freed)} ({len(self.removed)} entries); "
                f"cache {format_size(self.size_before)} -> {format_size(self.size_after)}")
        if self.skipped:
            line += f"; {len(self.skipped)} left alone (in use or being built)"
        return line

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {i.entry.kind} {i.entry.key[:24]} ({format_size(i.entry.disk_bytes)}, {i.entry.what}): "
                 f"{i.reason}" for i in self.removed]
        lines += [f"kept {i.entry.kind} {i.entry.key[:24]} ({format_size(i.entry.disk_bytes)}): {i.reason}"
                  for i in self.skipped]
        lines.append(self.summary())
        return "\n".join(lines)


def _image_build_running(cache: Path) -> bool:
    """Whether any image is being built now (it may be about to use a root no image names yet)."""
    images = cache / "images"
    for lock_path in images.glob("*.lock") if images.is_dir() else []:
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        except OSError:
            continue
        lock.release()
    return False


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():  # a non-root build's unpacked tree may hold read-only directories
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


def _remove(entry: CacheEntry, *, dry_run: bool) -> str | None:
    """Remove one entry under its locks; the reason it was left alone, or None."""
    folder = entry.path.parent
    key_lock, layer_lock = folder / f"{entry.key}.lock", folder / f"{entry.key}.build.lock"  # layers take both
    locks = [FileLock(str(p), timeout=0) for p in (key_lock, layer_lock)
             if p.exists() or (p == key_lock and not dry_run)]  # a dry run creates no files
    taken: list[FileLock] = []
    fd = -1
    try:
        for lock in locks:
            try:
                lock.acquire()
            except Timeout:
                return "its build lock is held (being built or looked up right now)"
            taken.append(lock)
        stamp = stamp_path(entry.path)
        if dry_run and not stamp.exists():
            return None
        try:
            fd = os.open(stamp, (os.O_RDONLY if dry_run else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "in use by a running process (a pytest run or a vmfork command)"
        except OSError as exc:
            return f"cannot lock its stamp {stamp}: {exc.strerror}"
        if dry_run or not entry.path.is_dir():
            return None
        aside = folder / (f".trash-{entry.key}-{os.getpid()}" if entry.kind_dir == "snapshots"
                          else f".old-{entry.key}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(entry.path, aside)
        except OSError as exc:
            return f"cannot move it aside: {exc.strerror}"
        stamp.unlink(missing_ok=True)
    finally:
        if fd >= 0:
            os.close(fd)
        for lock in reversed(taken):
            lock.release()
    _rmtree(aside)  # outside the locks: nobody can reach it under its key any more
    return None


def prune(
    cache_dir: Path | str,
    *,
    older_than: float | None = None,
    max_size: int | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Remove what no live process uses: entries whose dependants are gone, entries
    last used more than ``older_than`` seconds ago, then least recently used entries
    until the cache is at most ``max_size`` bytes. Never blocks: an entry that is
    being built or is used by a live process is skipped and reported."""
    cache = Path(cache_dir).expanduser()
    now = time.time() if now is None else now
    entries = list_entries(cache)
    report = PruneReport(dry_run=dry_run, size_before=sum(e.disk_bytes for e in entries))
    left = {(e.kind_dir, e.key): e for e in entries}

    def children(e: CacheEntry) -> list[CacheEntry]:
        child_dir = {"images": "snapshots", "roots": "images"}.get(e.kind_dir)
        return [c for c in left.values() if c.kind_dir == child_dir and c.parent == e.key]

    tried: set[tuple[str, str]] = set()

    def attempt(e: CacheEntry, reason: str) -> None:
        if (e.kind_dir, e.key) not in left or (e.kind_dir, e.key) in tried:
            return
        tried.add((e.kind_dir, e.key))
        if users := children(e):
            report.skipped.append(PruneItem(e, f"still needed by {users[0].kind} {users[0].key[:24]}"))
            return
        why = _remove(e, dry_run=dry_run)
        if why is None:
            del left[(e.kind_dir, e.key)]
            report.removed.append(PruneItem(e, reason))
        else:
            report.skipped.append(PruneItem(e, why))

    images = {e.key for e in entries if e.kind == "image"}
    for e in entries:  # a snapshot whose image is gone can never be restored
        if e.kind_dir == "snapshots" and e.parent and e.parent not in images:
            attempt(e, f"its image {e.parent[:12]} is gone")
    if any(e.kind == "root" for e in entries) and not _image_build_running(cache):
        named = {e.parent for e in entries if e.kind == "image"}
        for e in entries:
            if e.kind == "root" and e.key not in named:
                attempt(e, "no image uses this Debian root")
    if older_than is not None:
        for e in entries:
            if now - e.used > older_than:
                attempt(e, f"last used {format_age(now - e.used)}")
    if max_size is not None:
        for e in entries:  # least recently used first, dependants before what they need
            if sum(x.disk_bytes for x in left.values()) <= max_size:
                break
            attempt(e, f"least recently used ({format_age(now - e.used)}) while the cache is over "
                       f"{format_size(max_size)}")
    report.size_after = sum(e.disk_bytes for e in left.values())
    if not dry_run:
        _drop_stale_stamps(cache)
    return report


def _drop_stale_stamps(cache: Path) -> None:
    """Remove the stamps of entries removed by other means (a run's own layers, ``vmfork gc --kept``)."""
    for sub in KINDS_DIRS.values():
        folder = cache / sub
        for stamp in folder.glob(f"*{STAMP_SUFFIX}") if folder.is_dir() else []:
            entry = folder / stamp.name[: -len(STAMP_SUFFIX)]
            if entry.exists():
                continue
            try:
                fd = os.open(stamp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not entry.exists():  # a holder re-checks the entry after its lock: nothing can miss it
                    stamp.unlink(missing_ok=True)
            except OSError:
                pass  # held: a live process still has it open
            finally:
                os.close(fd)


def enforce_max_size(cache_dir: Path | str, max_size: int, progress: Callable[[str], None]) -> PruneReport:
    """The size cap a run applies at its end: prune least recently used entries
    this and every other live run leave unused, and say what was freed."""
    report = prune(cache_dir, max_size=max_size)
    if report.removed or report.size_after > max_size:
        over = (f"; still over the cap {format_size(max_size)}: the rest is in use"
                if report.size_after > max_size else "")
        progress(f"vmfork: cache size cap: {report.summary().removeprefix('vmfork cache: ')}{over}")
    return report
