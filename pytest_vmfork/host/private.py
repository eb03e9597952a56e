"""Private directories and files: what this uid trusts, nothing anyone else touched.

pytest-vmfork often runs as root. Its run directories (sockets, ``owner.json``,
``handles.json``), its lease root and its cache live in shared places (the
temp dir, ``/run``), so each of them is verified before use: a directory is
trusted only if it is a real directory (not a symlink), owned by this uid and
not writable by group or others. A directory of ours that others may only read
(created by an older version with the default umask) is tightened to 0700 in
place: nobody else could have put anything into it. Anything else is refused
with :class:`PrivateDirError`, naming the path and the fix.

Files inside are created without following symlinks (``O_NOFOLLOW`` and
``O_EXCL`` on a temporary name, then an atomic rename).

:func:`verify_cache_entry` is the check for a cache entry (an image or a
snapshot directory) before it is restored: an entry someone else can write is
never used. The one exception is a snapshot's guest RAM file (:data:`RAM_FILE`):
QEMU 7.2 opens it read-write even to map it privately, so when QEMU runs as an
unprivileged user (:mod:`pytest_vmfork.host.confine`) that user's group may write it,
and exactly that group is accepted there.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from pytest_vmfork.errors import VMForkError
from pytest_vmfork.host import confine

#: Mode of every directory pytest-vmfork creates for itself.
PRIVATE_MODE = 0o700
#: A snapshot's guest RAM file, which the QEMU user's group may write.
RAM_FILE = "memory.ram"


class PrivateDirError(VMForkError):
    """A directory pytest-vmfork must trust is owned by someone else, a symlink or
    writable by others."""


def _fix(path: Path) -> str:
    return (f"remove it (`rm -rf {path}`, after checking who created it) so it is created "
            "afresh with mode 0700, or point pytest-vmfork elsewhere")


def _check(path: Path, st: os.stat_result, what: str) -> None:
    uid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise PrivateDirError(f"{what} {path} is a symlink; refusing to use it: {_fix(path)}")
    if not stat.S_ISDIR(st.st_mode):
        raise PrivateDirError(f"{what} {path} is not a directory; refusing to use it: {_fix(path)}")
    if st.st_uid != uid:
        raise PrivateDirError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this uid {uid}; refusing to use it: {_fix(path)}")
    if st.st_mode & 0o022:
        raise PrivateDirError(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it: {_fix(path)}")


def private_dir(path: Path | str, what: str, *, create: bool = True) -> Path:
    """``path`` as a verified private directory: created with mode 0700 if missing
    (parents with the default mode), else checked; PrivateDirError otherwise.

    Group/other read or search bits on a directory we own and nobody else could
    write into are removed (0700), so an existing install keeps working.
    """
    path = Path(path)
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, PRIVATE_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise PrivateDirError(f"cannot create {what} {path}: {exc.strerror}; make its parent "
                                  "writable or point pytest-vmfork elsewhere") from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        try:
            _check(path, os.lstat(path), what)  # a symlink or a file: say so
        except FileNotFoundError:
            pass
        raise PrivateDirError(f"cannot open {what} {path}: {exc.strerror}; {_fix(path)}") from exc
    try:
        st = os.fstat(fd)
        _check(path, st, what)
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)
    finally:
        os.close(fd)
    return path


def verify_cache_entry(path: Path | str, *, ram_gid: int | None = None) -> None:
    """Refuse (PrivateDirError) a cache entry (an image or snapshot directory) that
    someone else could have written: the directory and every file in it must be
    owned by this uid, not symlinks, and not writable by group or others, except
    that a :data:`RAM_FILE` may be writable by group ``ram_gid`` (the QEMU user's:
    ``Run.qemu().ram_gid``; None accepts no group write at all).

    Call it before restoring an entry; a refused entry is treated like a damaged
    one (discarded and rebuilt)."""
    path = Path(path)
    uid = os.geteuid()
    _check(path, os.lstat(path), "cache entry")
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (*dirnames, *filenames):
            child = Path(dirpath) / name
            st = os.lstat(child)
            if stat.S_ISLNK(st.st_mode):
                raise PrivateDirError(f"cache entry {path}: {child} is a symlink; remove the entry to rebuild it")
            qemu_may_write = name == RAM_FILE and ram_gid is not None and st.st_gid == ram_gid
            if st.st_uid != uid or st.st_mode & (0o002 if qemu_may_write else 0o022):
                raise PrivateDirError(
                    f"cache entry {path}: {child} is writable by someone else (owner uid {st.st_uid}, "
                    f"mode {stat.S_IMODE(st.st_mode):04o}); remove the entry to rebuild it")


def seal(path: Path | str) -> None:
    """Take group and other write off a freshly built cache entry (a umask of 002 would
    leave them on), so :func:`verify_cache_entry` accepts what we built ourselves.
    A :data:`RAM_FILE` keeps the group write we gave the QEMU group
    (``confine.RAM_GROUP``; not our own group, which a umask could have given it)."""
    ram_gid = confine.ram_group_gid()
    for dirpath, dirnames, filenames in os.walk(path):
        for name in (".", *dirnames, *filenames):
            child = os.path.join(dirpath, name)
            st = os.lstat(child)
            keep = 0o020 if name == RAM_FILE and st.st_gid == ram_gid != os.getegid() else 0
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022 & ~keep:
                os.chmod(child, stat.S_IMODE(st.st_mode) & ~(0o022 & ~keep))


def create_file(path: Path | str, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``path`` atomically (mode 0600) without following symlinks: the data
    goes to a fresh temporary name (``O_EXCL | O_NOFOLLOW``) that is renamed (or,
    with ``exclusive``, hard-linked: FileExistsError if ``path`` exists) into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a dead process with this pid
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if exclusive:
            os.link(tmp, path)  # never follows or replaces an existing name
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: dict[str, Any], *, exclusive: bool = False) -> None:
    """:func:`create_file` for a JSON record."""
    create_file(path, json.dumps(data, sort_keys=True).encode(), exclusive=exclusive)


def run_base_dir() -> Path:
    """Where run directories live: ``$XDG_RUNTIME_DIR/vmfork`` when that is set,
    else ``<tmp>/vmfork-<uid>``. Not created or verified here (see :func:`private_dir`)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "vmfork"
    return Path(tempfile.gettempdir()) / f"vmfork-{os.getuid()}"
