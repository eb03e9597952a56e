"""Files and trees: PutFile, PutTree, GetFile and GetTree.

Writes arrive as client-streamed messages on the loop and land atomically (a
temporary beside the target, renamed); reads block on the disk, so they run on a
thread each and stream the content back in ``CHUNK`` pieces. Every failure names
the guest path and its errno (GuestFileError on the host).
"""

from __future__ import annotations

import errno
import os
import stat
import threading

from vmfork_agent.calls import CHUNK, Call, CallError, absolute, invalid, os_error

from pytest_vmfork import channel as ch
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.tree import TreeWriter


class PutFileCall(Call):
    """Write one guest file: a header, then its content; renamed into place at the end."""

    fd = -1
    tmp: str | None = None

    def start(self, first) -> None:
        if first.WhichOneof("msg") != "header":
            raise invalid("PutFile starts with a header")
        h = first.header
        self.path = path = absolute(h.path)
        parent, name = os.path.split(path)
        self.size = 0
        try:
            make_dirs(parent)
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            try:
                self.mode = h.mode & 0o7777 if h.set_mode else stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                self.mode = 0o644
            # Written beside the target and renamed over it: no reader sees half a file.
            self.tmp = os.path.join(parent, f".{name}.vmfork-{os.urandom(4).hex()}")
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise self.failed(exc) from None

    def failed(self, exc: OSError) -> CallError:
        named = exc.filename if isinstance(exc.filename, str) and exc.filename != self.tmp else self.path
        self.close()
        return os_error(exc, named)

    def data(self, payload: bytes) -> None:
        if self.fd < 0:
            return
        data = pb.PutFileRequest.FromString(payload).data
        try:
            write_all(self.fd, data)
        except OSError as exc:
            raise self.failed(exc) from None
        self.size += len(data)

    def end(self) -> None:
        if self.fd < 0:
            return
        try:
            os.fchmod(self.fd, self.mode)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
            self.tmp = None
        except OSError as exc:
            raise self.failed(exc) from None
        self.finish(pb.PutResponse(bytes=self.size, entries=1))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None

    def cancel(self) -> None:
        self.done = True
        self.close()


class PutTreeCall(Call):
    """Write a tree under a guest directory: the directory, then its entries (tree.TreeWriter)."""

    writer = None

    def start(self, first) -> None:
        if first.WhichOneof("msg") != "guest_dir":
            raise invalid("PutTree starts with the guest directory")
        root = absolute(first.guest_dir)

        def fail(why: str):
            raise invalid(f"put_tree: {why}")

        self.writer = TreeWriter(root, fail=fail)
        try:
            make_dirs(root)
        except OSError as exc:
            raise self.failed(exc) from None

    def failed(self, exc: OSError) -> CallError:
        writer, self.writer = self.writer, None
        writer.close()
        return os_error(exc, exc.filename if isinstance(exc.filename, str) else writer.path)

    def data(self, payload: bytes) -> None:
        if self.writer is None:
            return
        try:
            self.writer.add(pb.PutTreeRequest.FromString(payload).entry)
        except OSError as exc:
            raise self.failed(exc) from None
        except CallError:
            self.close()
            raise

    def end(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.finish()
        except OSError as exc:
            raise self.failed(exc) from None
        writer, self.writer = self.writer, None
        writer.close()
        self.finish(pb.PutResponse(bytes=writer.bytes, entries=writer.entries))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def cancel(self) -> None:
        self.done = True
        self.close()


def get_file(call: Call, req) -> None:
    """GetFile: opened (and refused) here, on the loop; read out on a thread."""
    path = absolute(req.path)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        except OSError:
            os.close(fd)
            raise
    except OSError as exc:
        raise os_error(exc, path) from None
    threading.Thread(target=send_file, args=(call, fd, path, st), name="get-file", daemon=True).start()


def get_tree(call: Call, req) -> None:
    """GetTree: the root checked here, on the loop; walked on a thread."""
    root = absolute(req.guest_dir)
    try:
        if not os.path.isdir(root):
            os.stat(root)  # ENOENT if missing
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), root)
    except OSError as exc:
        raise os_error(exc, root) from None
    threading.Thread(target=send_tree, args=(call, root), name="get-tree", daemon=True).start()


def send_file(call: Call, fd: int, path: str, st: os.stat_result) -> None:
    """GetFile's thread: a header (size, mode), then the content in CHUNK pieces."""
    with open(fd, "rb", buffering=0) as f:
        try:
            head = pb.FileChunk(size=st.st_size, mode=stat.S_IMODE(st.st_mode))
            call.send(ch.DATA, head.SerializeToString())
            while call.live and (data := f.read(CHUNK)):
                call.send(ch.DATA, pb.FileChunk(data=data).SerializeToString())
        except OSError as exc:
            call.fail(os_error(exc, path))
            return
    call.finish()


def send_tree(call: Call, root: str) -> None:
    """GetTree's thread: the entries under ``root``, parents first."""
    try:
        for entry in walk_tree(root):
            if not call.live:
                return
            call.send(ch.DATA, entry.SerializeToString())
    except OSError as exc:
        call.fail(os_error(exc, exc.filename if isinstance(exc.filename, str) else root))
        return
    call.finish()


def make_dirs(path: str) -> None:
    """mkdir -p, with ENOTDIR (not EEXIST) when a component is not a directory."""
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    make_dirs(os.path.dirname(path))
    os.mkdir(path, 0o755)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def walk_tree(root: str):
    """(kind, relative path, mode, target, fd) for everything under ``root``:
    a directory before its entries, names sorted, symlinks never followed."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                yield pb.TreeEntry(kind=pb.TreeEntry.SYMLINK, path=r, target=os.readlink(e.path))
            elif stat.S_ISDIR(st.st_mode):
                yield pb.TreeEntry(kind=pb.TreeEntry.DIR, path=r, mode=stat.S_IMODE(st.st_mode))
                stack.append(r)
            elif stat.S_ISREG(st.st_mode):
                with open(e.path, "rb", buffering=0) as f:
                    kind = pb.TreeEntry.FILE
                    while True:
                        data = f.read(CHUNK)
                        if kind == pb.TreeEntry.FILE:
                            yield pb.TreeEntry(kind=kind, path=r, mode=stat.S_IMODE(st.st_mode), data=data)
                            kind = pb.TreeEntry.DATA
                        elif data:
                            yield pb.TreeEntry(kind=kind, data=data)
                        if not data:
                            break

