"""Files in and out of a running fork, over the agent's control channel.

Content travels as streams of messages of at most :data:`CHUNK` bytes
(client-streaming for puts, server-streaming for gets, trees as a stream of
entries; docs/protocol.md), so a 100 MiB file needs no 100 MiB message, memory
stays bounded on both sides, and other calls' frames pass between a transfer's
chunks (an exec during a big put still answers).

What ``data`` means in :func:`put`: ``bytes`` (or bytearray/memoryview) and
``str`` (UTF-8) are the file's *content*; an ``os.PathLike`` (``pathlib.Path``)
names a *host file* whose content is streamed. A plain ``str`` is never a path.

Trees keep permission bits and symlinks (recreated with the same target text,
never followed); owners and timestamps are not kept; a directory's own mode is
set after its entries are written. Whatever comes back from the guest is
untrusted: sizes and entry counts are bounded, entry paths must be plain
relative paths whose parent came earlier in the stream, and nothing is written
through a symlink, so a guest cannot make :func:`get_tree` write outside
``host_dir``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO, Iterator, NoReturn, Union

from pytest_vmfork import channel as ch
from pytest_vmfork.errors import ConfigError, GuestError, GuestFileError
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.tree import TreeWriter
from pytest_vmfork.vm.agent import AgentClient

CHUNK = ch.CHUNK  # file content per message, both ways
DEFAULT_TIMEOUT = 300.0  # seconds per transfer (a whole put/get/tree)
MAX_GET_BYTES = 1 << 30  # get() returns the file in memory
MAX_TREE_BYTES = 16 << 30
MAX_TREE_ENTRIES = 1_000_000

#: ``data`` for :func:`put`: content (bytes, str) or a host file (os.PathLike).
Data = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

_TE = pb.TreeEntry


def _guest_path(op: str, path: object) -> str:
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ConfigError(f"{op}: guest path {path!r} must be an absolute path string, like '/etc/app.conf'")
    return path


def _timeout(op: str, timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{op}: timeout={timeout!r} must be a positive number of seconds")
    return float(timeout)


def _guest_failed(op: str, exc: Exception, path: str) -> GuestError:
    """The error for a failed transfer: it names the operation, the path and the cause."""
    if isinstance(exc, GuestFileError):
        hint = ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = ("; the guest's filesystem is full (its writable layer is tmpfs in guest RAM: "
                    "raise Template(memory_mib=...) or write less)")
        return GuestFileError(f"{op} {path} failed: {exc}{hint}", guest_path=exc.guest_path or path, errno=exc.errno)
    if isinstance(exc, TimeoutError):
        return GuestError(f"{op} {path}: {exc}; pass a larger timeout= for big transfers")
    return GuestError(f"{op} {path} failed: {exc}")


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while data := f.read(CHUNK):
        yield data


def put(agent: AgentClient, guest_path: str, data: Data, *, mode: int | None, timeout: float) -> None:
    """Write one guest file (atomically: a temporary file renamed over it).

    Missing parent directories are created (0755). ``mode`` is the file's
    permission bits; without it a new file gets 0644 and an existing one keeps
    its mode.
    """
    path = _guest_path("put", guest_path)
    timeout = _timeout("put", timeout)
    if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
        raise ConfigError(f"put {path}: mode={mode!r} must be permission bits from 0 to 0o7777, like 0o755")
    header = pb.PutFileRequest(header=pb.PutFileHeader(path=path, mode=mode or 0, set_mode=mode is not None))
    if isinstance(data, os.PathLike):
        host = Path(data)
        if host.is_dir():
            raise ConfigError(f"put {path}: host path {host} is a directory; use put_tree() for trees")
        try:
            f = open(host, "rb")
        except OSError as exc:
            raise ConfigError(f"put {path}: cannot read host file {host}: {exc.strerror}") from exc
        with f:
            _send_file(agent, path, header, _chunks(f), timeout)
        return
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigError(
            f"put {path}: data must be bytes or str (the content) or a pathlib.Path (a host file), "
            f"got {type(data).__name__}"
        )
    view = memoryview(data).cast("B")
    _send_file(agent, path, header, (bytes(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK)), timeout)


def _send_file(agent: AgentClient, path: str, header: pb.PutFileRequest, chunks: Iterator[bytes],
               timeout: float) -> None:
    def requests() -> Iterator[pb.PutFileRequest]:
        yield header
        for chunk in chunks:
            yield pb.PutFileRequest(data=chunk)

    try:
        agent.put_file(requests(), timeout)
    except (GuestError, TimeoutError) as exc:
        raise _guest_failed("put", exc, path) from exc


def get(agent: AgentClient, guest_path: str, *, timeout: float, max_bytes: int = MAX_GET_BYTES) -> bytes:
    """A guest file's content; more than ``max_bytes`` is an error, not a truncation."""
    path = _guest_path("get", guest_path)
    timeout = _timeout("get", timeout)
    out = bytearray()
    stream = agent.get_file(path, timeout)
    try:
        for chunk in stream:  # the first carries the size and mode, no data: the content decides
            out += chunk.data
            if len(out) > max_bytes:
                break
    except (GuestError, TimeoutError) as exc:
        raise _guest_failed("get", exc, path) from exc
    finally:
        stream.close()  # type: ignore[attr-defined]
    if len(out) > max_bytes:
        raise GuestError(f"get {path}: the file is larger than max_bytes={max_bytes}; raise max_bytes= or use get_tree()")
    return bytes(out)


# --- trees --------------------------------------------------------------------


def _scan(root: Path) -> Iterator[tuple[str, "os.DirEntry[str]", os.stat_result]]:
    """Everything under ``root``: a directory before its entries, names sorted,
    symlinks not followed."""
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(root / rel if rel else root) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            yield r, e, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(r)


def walk(root: Path) -> Iterator[pb.TreeEntry]:
    """The entries of a put_tree stream; file content in CHUNK-sized pieces."""
    for r, e, st in _scan(root):
        if stat.S_ISLNK(st.st_mode):
            yield _TE(kind=_TE.SYMLINK, path=r, target=os.readlink(e.path))
        elif stat.S_ISDIR(st.st_mode):
            yield _TE(kind=_TE.DIR, path=r, mode=stat.S_IMODE(st.st_mode))
        else:
            with open(e.path, "rb") as f:
                yield _TE(kind=_TE.FILE, path=r, mode=stat.S_IMODE(st.st_mode), data=f.read(CHUNK))
                for data in _chunks(f):
                    yield _TE(kind=_TE.DATA, data=data)


def put_tree(agent: AgentClient, host_dir: "str | os.PathLike[str]", guest_dir: str, *, timeout: float) -> None:
    """Copy the contents of ``host_dir`` into ``guest_dir`` (created if missing;
    its own mode is left alone), merging with what is there."""
    root = _host_dir("put_tree", host_dir, create=False)
    path = _guest_path("put_tree", guest_dir)
    timeout = _timeout("put_tree", timeout)

    def requests() -> Iterator[pb.PutTreeRequest]:
        yield pb.PutTreeRequest(guest_dir=path)
        for entry in walk(root):
            yield pb.PutTreeRequest(entry=entry)

    for _, e, st in _scan(root):  # refused before any byte is sent
        if not (stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ConfigError(f"put_tree: {e.path} is not a regular file, directory or symlink; remove it")
    try:
        agent.put_tree(requests(), timeout)
    except (GuestError, TimeoutError) as exc:
        raise _guest_failed("put_tree", exc, path) from exc


def _host_dir(op: str, host_dir: object, *, create: bool) -> Path:
    if not isinstance(host_dir, (str, os.PathLike)):
        raise ConfigError(f"{op}: host_dir must be a path (str or pathlib.Path), got {type(host_dir).__name__}")
    root = Path(host_dir)
    if root.is_dir():
        return root
    if root.exists() or root.is_symlink():
        raise ConfigError(f"{op}: host path {root} is not a directory")
    if not create:
        raise ConfigError(f"{op}: host directory {root} does not exist")
    root.mkdir(parents=True)
    return root


def get_tree(
    agent: AgentClient,
    guest_dir: str,
    host_dir: "str | os.PathLike[str]",
    *,
    timeout: float,
    max_bytes: int = MAX_TREE_BYTES,
    max_entries: int = MAX_TREE_ENTRIES,
) -> None:
    """Copy the contents of ``guest_dir`` into ``host_dir`` (created if missing)."""
    path = _guest_path("get_tree", guest_dir)
    timeout = _timeout("get_tree", timeout)
    root = _host_dir("get_tree", host_dir, create=True)
    def fail(why: str) -> NoReturn:
        raise GuestError(f"get_tree: the guest sent a bad tree ({why}); nothing more was written to {root}")

    writer = TreeWriter(str(root), fail=fail, max_bytes=max_bytes, max_entries=max_entries)
    stream = agent.get_tree(path, timeout)
    try:
        for entry in stream:
            writer.add(entry)
        writer.finish()
    except (GuestFileError, TimeoutError) as exc:
        raise _guest_failed("get_tree", exc, path) from exc
    except OSError as exc:
        raise ConfigError(f"get_tree {path}: writing under host directory {root} failed: {exc}") from exc
    finally:
        writer.close()
        stream.close()  # type: ignore[attr-defined]
