"""Sweeps partial builds in the cache: a snapshot build's ``.staging-*`` and a
prune's ``.trash-*`` (``snapshots/``), and the ``.staging-*``/``.old-*`` directories of
image, Debian root and module builds. A builder that dies (or a prune interrupted
before its delete) leaves them, each as big as a whole entry. One is removed only
while nobody holds its key's build lock, so a running build is never touched."""

from __future__ import annotations

import re

from filelock import FileLock, Timeout

from pytest_vmfork.host import procid
from pytest_vmfork.janitor.sweep import Sweep

_SNAP_PARTIAL_RE = re.compile(r"\.(staging|trash)-([0-9A-Za-z_]+)-(\d+)")
_IMAGE_PARTIAL_RE = re.compile(r"\.(staging|old)-([0-9A-Za-z_]+)-(\d+)-[0-9a-f]+")
_FOLDERS = (("snapshots", _SNAP_PARTIAL_RE, "snapshot-partial"),
            ("images", _IMAGE_PARTIAL_RE, "image-partial"),
            ("roots", _IMAGE_PARTIAL_RE, "root-partial"),
            ("modules", _IMAGE_PARTIAL_RE, "modules-partial"))


def sweep(sw: Sweep) -> None:
    """Remove every partial build in the cache whose key nobody is building."""
    if sw.cache_dir is None:
        return
    for sub, pattern, kind in _FOLDERS:
        folder = sw.cache_dir / sub
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(".*")):
            sw.check_time()
            m = pattern.fullmatch(path.name)
            if not m or not path.is_dir():
                continue
            what, key, pid = m.group(1), m.group(2), int(m.group(3))
            st = procid.proc_stat(pid)
            builder = "gone" if st is None else ("a zombie" if st.state == "Z" else None)
            lock_path = folder / f"{key}.lock"
            # A builder creates the key's lock file before its staging dir: without
            # one nobody builds the key (and a dry run creates no files).
            lock = FileLock(str(lock_path), timeout=0) if lock_path.exists() else None
            try:
                if lock is not None:
                    lock.acquire()
            except Timeout:
                sw.report.skip(kind, path, f"a build of {key[:16]} holds its lock (builder pid {pid})")
                continue
            except OSError as exc:
                sw.report.skip(kind, path, f"cannot open its lock: {exc.strerror}")
                continue
            try:  # nobody builds this key now: the directory is not in use
                reason = (f"{what} of a build whose builder pid {pid} is {builder}" if builder else
                          f"{what} of a finished build (pid {pid} holds no build lock: reused)")
                sw.rmtree(kind, path, reason)
            finally:
                if lock is not None:
                    lock.release()
