"""Writing a directory tree from a stream of ``TreeEntry`` messages: one codec for both ends.

``vm.put_tree`` streams a host tree into the guest and ``vm.get_tree`` a guest tree
to the host; each receiving side runs this writer, so the guest agent (which gets
this module copied into its image, like the mailbox codec) and the host share one
implementation. Entries are untrusted on both sides: paths must be plain relative
paths whose parents were written as directories by this very stream (so no symlink
can redirect a write outside ``root``), files are opened with ``O_NOFOLLOW|O_EXCL``,
and the total bytes and entries are bounded. Directory modes are applied last,
deepest first, so a read-only directory can still be filled.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Callable, NoReturn

from pytest_vmfork.proto import agent_pb2 as pb

_TE = pb.TreeEntry


class TreeWriter:
    """Writes entries under ``root``. ``fail(why)`` raises the receiving side's error
    for a malformed stream (an INVALID_ARGUMENT error in the guest, a GuestError on the host);
    OSError from the filesystem propagates with its errno and path."""

    def __init__(self, root: str, *, fail: Callable[[str], NoReturn], max_bytes: int | None = None,
                 max_entries: int | None = None) -> None:
        self.root, self.fail = str(root), fail
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.dirs = {""}
        self.modes: list[tuple[str, int]] = []
        self.fd: int | None = None
        self.fd_mode = 0
        self.path = self.root  # the entry being written, for error messages
        self.bytes = self.entries = 0

    def _write(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.max_bytes is not None and self.bytes > self.max_bytes:
            self.fail(f"the tree exceeds max_bytes={self.max_bytes} bytes")
        view = memoryview(data)
        while view:
            assert self.fd is not None
            view = view[os.write(self.fd, view):]

    def _end_file(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fchmod(fd, self.fd_mode)
            finally:
                os.close(fd)

    def add(self, e: Any) -> None:
        """Write one entry (a ``TreeEntry``); DATA entries continue the last FILE."""
        if e.kind == _TE.DATA:
            if self.fd is None:
                self.fail("file data without a file entry")
            self._write(e.data)
            return
        self._end_file()
        self.entries += 1
        if self.max_entries is not None and self.entries > self.max_entries:
            self.fail(f"the tree has more than max_entries={self.max_entries} entries")
        rel = e.path
        if not rel or "\0" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
            self.fail(f"entry path {rel[:200]!r} is not a plain relative path")
        if rel.rpartition("/")[0] not in self.dirs:  # every parent is a directory this stream made or checked
            self.fail(f"entry {rel[:200]!r} comes before its directory")
        self.path = path = os.path.join(self.root, rel)
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if e.kind == _TE.DIR:
            if not is_dir:
                if st is not None:
                    os.unlink(path)
                os.mkdir(path, 0o700)
            self.dirs.add(rel)
            self.modes.append((path, e.mode & 0o7777))
        elif e.kind in (_TE.FILE, _TE.SYMLINK):
            if is_dir:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)  # a file in the tree
            if st is not None:
                os.unlink(path)
            if e.kind == _TE.SYMLINK:
                os.symlink(e.target, path)
            else:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                self.fd_mode = e.mode & 0o7777
                self._write(e.data)
        else:
            self.fail(f"entry {rel[:200]!r} has unknown kind {e.kind}")

    def finish(self) -> None:
        """Close the last file and apply the directory modes, deepest first."""
        self._end_file()
        for path, mode in reversed(self.modes):
            self.path = path
            os.chmod(path, mode)

    def close(self) -> None:
        """Release the open file, if any (after an error)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
