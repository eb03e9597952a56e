#!/usr/bin/env python3
"""pytest-vmfork guest agent: PID-1's long-lived helper inside every VM.

It serves the gRPC ``Agent`` API (pytest_vmfork/proto/agent.proto) over a
virtio-serial port, owns the mailboxes the host patches into memory, and on
every resume (fork) it reseeds randomness, sets the clock, delivers mailbox
payloads, applies the network handoff and then tells the host it is ready.

Channels (both virtio-serial, so neither depends on the guest's network):
- ``org.vmfork.ctl``: a byte pipe bridged to the local gRPC server socket.
- ``org.vmfork.evt``: line events to the host (``vmfork-evt event=ready ...``);
  from the host, a single doorbell byte queued *before* the vCPUs resume, so
  the resume thread's blocked ``read()`` returns the moment the fork runs.
  No polling and no host-to-guest RPC on the resume path.

The resume path runs under TCG in a freshly started QEMU that must translate
every guest instruction again, so it is kept short: no imports, no logging to
the console, pre-opened file descriptors, pre-built objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import pty
import random
import select
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
import time
from concurrent import futures

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # grpc core writes straight to the console otherwise
import grpc  # noqa: E402
from pyroute2 import IPRoute  # noqa: E402

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.tree import TreeWriter
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.proto import agent_pb2_grpc as pb_grpc

AGENT_VERSION = "1"
PORT_CTL = "org.vmfork.ctl"
PORT_EVT = "org.vmfork.evt"
RUN_DIR = "/run/vmfork"
GRPC_SOCK = RUN_DIR + "/agent.sock"
MAILBOX_DIR = RUN_DIR + "/mailbox"
DOORBELL = b"R"
RNDRESEEDCRNG = 0x5207
NUD_REACHABLE = 0x02
CHILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
START = time.monotonic()
CHUNK = 1 << 20  # file content per gRPC message (pytest_vmfork/files.py uses the same)
OUTPUT_LIMIT = 1 << 20  # default bytes kept per spawned process stream
EXEC_OUTPUT_LIMIT = 8 << 20  # default bytes kept of an exec's stdout and of its stderr
MAX_OUTPUT_LIMIT = 64 << 20
MAX_PROCESSES = 1024  # records kept; the oldest exited ones go first
MAX_WAIT_S = 10.0  # a ReadProcess long poll holds a server thread at most this long
SHELL_CHUNK = 65536  # bytes per PTY read or write
_libc = ctypes.CDLL(None, use_errno=True)


try:  # non-blocking: a stalled serial console must never stall an agent thread
    _CONSOLE = os.open("/dev/console", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
except OSError:
    _CONSOLE = 2


def log(msg: str) -> None:
    try:
        os.write(_CONSOLE, f"vmfork-agent: {msg}\n".encode())
    except OSError:
        pass  # console full or gone: drop the line


def cmdline_params() -> dict[str, str]:
    """``vmfork.key=value`` words from the kernel command line."""
    with open("/proc/cmdline") as f:
        words = f.read().split()
    out = {}
    for w in words:
        if w.startswith("vmfork."):
            key, _, value = w[len("vmfork.") :].partition("=")
            out[key] = value
    return out


def find_port(name: str, timeout: float = 30.0) -> str:
    """The /dev node of the virtio-serial port called ``name`` (no udev here)."""
    deadline = time.monotonic() + timeout
    while True:
        base = "/sys/class/virtio-ports"
        for entry in os.listdir(base) if os.path.isdir(base) else ():
            try:
                with open(f"{base}/{entry}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{entry}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name} did not appear")
        time.sleep(0.05)  # boot only: the module may still be probing


class GuestMailbox:
    """One page of mlock'ed memory whose physical address the host learns."""

    def __init__(self, name: str, nonce: bytes) -> None:
        self.name = name
        self.size = mbx.PAGE_SIZE
        self.mem = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[:] = mbx.initial_image(name, nonce, self.size)  # faults the page in
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        if _libc.mlock(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.size)) != 0:
            raise OSError(ctypes.get_errno(), f"mlock mailbox {name}")
        self.phys = self._physical_address()
        self.last_seq = mbx.sequence_of(self.mem)
        self.payload = b""
        self.generation = 0

    def _physical_address(self) -> int:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((self.addr // mbx.PAGE_SIZE) * 8)
            (entry,) = struct.unpack("<Q", f.read(8))
        if not entry >> 63 & 1:
            raise RuntimeError(f"mailbox {self.name} page is not present")
        pfn = entry & ((1 << 55) - 1)
        if pfn == 0:
            raise RuntimeError("pagemap hides PFNs: the agent must run as root")
        return pfn * mbx.PAGE_SIZE

    def take(self) -> mbx.Delivery | None:
        got = mbx.read(self.mem, self.last_seq)
        if got is not None:
            self.last_seq = got.sequence
        return got


FRAME = struct.Struct("<II")  # session id, length (0: the session ended)


class _Session:
    """One connection to the in-guest gRPC server and the thread that frames its
    replies. Made *spare* (no session id yet) ahead of use: the server accepts
    it and sets its HTTP/2 transport up then, and its first bytes (the server's
    SETTINGS) wait in ``held`` until the session is given an id."""

    def __init__(self, bridge: "Bridge") -> None:
        self.bridge = bridge
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(GRPC_SOCK)
        self.sid = 0
        self.active = threading.Event()
        threading.Thread(target=self._pump_out, name="bridge-out", daemon=True).start()

    def start(self, sid: int) -> None:
        self.sid = sid
        self.active.set()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.active.set()  # a spare that never started: let its thread end
        self.sock.close()

    def _pump_out(self) -> None:
        first = True
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not self.active.is_set():
                if not data:
                    break  # the server closed the spare: the next session connects itself
                self.active.wait()  # hold the server's first bytes until the session starts
            if not self.sid:
                break  # closed while spare
            try:
                self.bridge._send(self.sid, data)  # an empty frame tells the host the session ended
            except OSError:
                break
            if not data:
                break
            if first:  # the session's first reply is out: now the bridge may do its housekeeping
                first = False
                self.bridge.replenish()
        self.bridge._gone(self)
        self.sock.close()


class Bridge:
    """Carries gRPC's HTTP/2 sessions over the ctl virtio-serial port.

    The byte stream is framed by the host (pytest_vmfork/vmm.py): every chunk
    carries a random session id, one per host client connection. A new id
    opens a fresh connection to the in-guest gRPC server, so a session never
    continues across a restore (every fork's first id is new) or across a
    host reconnect; stale bytes of an old session are dropped on both sides.

    The connection for the *next* session is made ahead (a spare, already
    accepted by the gRPC server), and a replaced session is closed only after
    the new one answered: a template's spare is in its snapshot, so a fork's
    first RPC skips the server's accept and transport set-up and the old
    session's teardown (under TCG every one of those code paths would be
    translated anew in each fork).
    """

    def __init__(self, port_path: str) -> None:
        self.fd = os.open(port_path, os.O_RDWR)
        self.lock = threading.Lock()
        self.wlock = threading.Lock()
        self.inner: _Session | None = None
        self.spare: _Session | None = None
        self.retired: list[_Session] = []
        self.sid = 0

    def reset(self, *, defer: bool = False) -> None:
        """End the current session; with ``defer`` its close waits for the next
        session's first reply (a fork replacing the template's session)."""
        with self.lock:
            inner, self.inner = self.inner, None
            if inner is not None and defer:
                self.retired.append(inner)
                return
        if inner is not None:
            inner.close()

    def replenish(self) -> None:
        """Close retired sessions and make the next spare: off the first reply's path."""
        with self.lock:
            retired, self.retired = self.retired, []
            need = self.spare is None
        for old in retired:
            old.close()
        if need:
            try:
                spare = _Session(self)
            except OSError:
                return  # the server is not up (boot): the next session connects itself
            with self.lock:
                if self.spare is None:
                    self.spare, spare = spare, None
            if spare is not None:
                spare.close()

    def _gone(self, session: _Session) -> None:
        with self.lock:
            if self.inner is session:
                self.inner = None
            if self.spare is session:
                self.spare = None

    def _send(self, sid: int, data: bytes) -> None:
        view = memoryview(FRAME.pack(sid, len(data)) + data)
        with self.wlock:
            while view:
                view = view[os.write(self.fd, view) :]

    def _inner(self, sid: int) -> socket.socket:
        with self.lock:
            if self.inner is None:
                session, self.spare = self.spare, None
                if session is None:
                    session = _Session(self)
                session.start(sid)
                self.inner = session
            return self.inner.sock

    def run(self) -> None:
        """Parse frames as bytes arrive and forward each payload piece by piece.

        A virtio-serial read returns at most one (4 KiB) buffer, so a frame is
        never assembled in memory first: a big transfer streams through with
        one copy, and small RPCs' frames pass between its pieces.
        """
        header = bytearray()
        remaining = 0  # payload bytes of the current frame still to forward
        inner: socket.socket | None = None
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # no host connected (never on a fork: QEMU holds it)
                header.clear()
                remaining, inner = 0, None
                self.reset()
                time.sleep(0.05)
                continue
            view = memoryview(chunk)
            while view:
                if remaining:
                    n = min(remaining, len(view))
                    if inner is not None:
                        try:
                            inner.sendall(view[:n])
                        except OSError:  # the session is gone: drop the rest of this frame
                            self.reset()
                            inner = None
                    remaining -= n
                    view = view[n:]
                    continue
                need = FRAME.size - len(header)
                header += view[:need]
                view = view[need:]
                if len(header) < FRAME.size:
                    break
                sid, length = FRAME.unpack(header)
                header.clear()
                if sid != self.sid:
                    self.reset(defer=True)
                    self.sid = sid
                if not length:  # the host's session ended
                    self.reset()
                    inner = None
                    continue
                inner = self._inner(sid)
                remaining = length


class FastNetlink:
    """The resume path's network apply: three rtnetlink requests built at boot.

    pyroute2 builds the messages once, with placeholder values; on resume only
    the MAC, address, prefix and gateway bytes are patched in and the requests
    go out on a plain netlink socket. A cold pyroute2 apply in a freshly
    restored TCG guest costs ~250 ms (every code path is translated again);
    this costs a few. The full pyroute2 path remains for the gRPC fallback
    and for anything but a fresh fork's interface.
    """

    MAC, IP, GW, GW_MAC = "02:00:5e:10:00:77", "198.51.100.77", "198.51.100.1", "02:00:5e:10:00:01"

    def __init__(self, index: int) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.ndmsg import ndmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        new = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        link = ifinfmsg()
        link["index"], link["flags"], link["change"] = index, 1, 1  # IFF_UP
        link["attrs"] = [("IFLA_ADDRESS", self.MAC)]
        link["header"]["type"], link["header"]["flags"] = 16, NLM_F_REQUEST | NLM_F_ACK  # RTM_NEWLINK
        addr = ifaddrmsg()
        addr["family"], addr["prefixlen"], addr["index"] = socket.AF_INET, 24, index
        addr["attrs"] = [("IFA_LOCAL", self.IP), ("IFA_ADDRESS", self.IP)]
        addr["header"]["type"], addr["header"]["flags"] = 20, new  # RTM_NEWADDR
        route = rtmsg()
        route["family"], route["table"], route["proto"], route["scope"], route["type"] = socket.AF_INET, 254, 3, 0, 1
        route["attrs"] = [("RTA_GATEWAY", self.GW), ("RTA_OIF", index)]
        route["header"]["type"], route["header"]["flags"] = 24, new  # RTM_NEWROUTE
        neigh = ndmsg()
        neigh["family"], neigh["ifindex"], neigh["state"] = socket.AF_INET, index, NUD_REACHABLE
        neigh["attrs"] = [("NDA_DST", self.GW), ("NDA_LLADDR", self.GW_MAC)]
        neigh["header"]["type"], neigh["header"]["flags"] = 28, new  # RTM_NEWNEIGH
        self.msgs = []
        for msg in (link, addr, route, neigh):
            msg.encode()
            self.msgs.append(bytes(msg.data))
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 1000

    @staticmethod
    def _patch(msg: bytes, old: bytes, new: bytes) -> bytes:
        at = msg.index(old)
        return msg[:at] + new + msg[at + len(old):]

    def apply(self, mac: str, ip: str, prefix: int, gateway: str | None, gateway_mac: str | None) -> None:
        link, addr, route, neigh = self.msgs
        link = self._patch(link, _mac_bytes(self.MAC), _mac_bytes(mac))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = addr[:17] + bytes([prefix]) + addr[18:]  # ifa_prefixlen follows nlmsghdr and ifa_family
        batch = [link, addr]
        if gateway:
            batch.append(self._patch(route, socket.inet_aton(self.GW), socket.inet_aton(gateway)))
            if gateway_mac:  # the host's bridge: the ack needs no ARP round trip (nor the RX path)
                neigh = self._patch(neigh, socket.inet_aton(self.GW), socket.inet_aton(gateway))
                batch.append(self._patch(neigh, _mac_bytes(self.GW_MAC), _mac_bytes(gateway_mac)))
        for msg in batch:
            self.seq += 1
            msg = msg[:8] + struct.pack("<I", self.seq) + msg[12:]
            self.sock.send(msg)
            reply = self.sock.recv(65536)
            mtype, = struct.unpack_from("<H", reply, 4)
            error, = struct.unpack_from("<i", reply, 16)
            if mtype != 2 or error != 0:  # NLMSG_ERROR carrying 0 is the ack
                raise OSError(-error, f"rtnetlink request {struct.unpack_from('<H', msg, 4)[0]} failed")


# --- files ------------------------------------------------------------------

_ERRNO_STATUS = {
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EROFS: grpc.StatusCode.PERMISSION_DENIED,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def abort_os(context, exc: OSError, path: str) -> None:
    """End the RPC with the errno name and the guest path the host reports."""
    code = exc.errno or errno.EIO
    name = errno.errorcode.get(code, str(code))
    context.set_trailing_metadata((("vmfork-errno", name), ("vmfork-path", path)))
    context.abort(_ERRNO_STATUS.get(code, grpc.StatusCode.FAILED_PRECONDITION),
                  f"{path}: {exc.strerror or os.strerror(code)} ({name})")


def _absolute(context, path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"guest path {path!r} is not absolute")
    return os.path.normpath(path)


def _make_dirs(path: str) -> None:
    """mkdir -p, with ENOTDIR (not EEXIST) when a component is not a directory."""
    if os.path.isdir(path):
        return
    if os.path.lexists(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    _make_dirs(os.path.dirname(path))
    os.mkdir(path, 0o755)


def _write_all(fd: int, data: bytes) -> None:
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
            else:
                raise OSError(errno.EINVAL, "not a regular file, directory or symlink", e.path)


class GuestFiles:
    """The file RPCs: content streams in CHUNK-sized messages, errors carry errno + path."""

    def PutFile(self, request_iterator, context):  # noqa: N802
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PutFile starts with a header")
        h = first.header
        path = _absolute(context, h.path)
        parent, name = os.path.split(path)
        tmp, size = None, 0
        try:
            _make_dirs(parent)
            if os.path.isdir(path):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
            try:
                mode = h.mode & 0o7777 if h.set_mode else stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                mode = 0o644
            # Written beside the target and renamed over it: no reader sees half a file.
            tmp = os.path.join(parent, f".{name}.vmfork-{os.urandom(4).hex()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for msg in request_iterator:
                    _write_all(fd, msg.data)
                    size += len(msg.data)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            tmp = None
        except OSError as exc:
            named = exc.filename if isinstance(exc.filename, str) and exc.filename != tmp else path
            abort_os(context, exc, named)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        return pb.PutResponse(bytes=size, entries=1)

    def GetFile(self, request, context):  # noqa: N802
        path = _absolute(context, request.path)
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
            abort_os(context, exc, path)
        with open(fd, "rb", buffering=0) as f:
            try:
                yield pb.FileChunk(size=st.st_size, mode=stat.S_IMODE(st.st_mode))
                while data := f.read(CHUNK):
                    yield pb.FileChunk(data=data)
            except OSError as exc:
                abort_os(context, exc, path)

    def PutTree(self, request_iterator, context):  # noqa: N802
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "guest_dir":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PutTree starts with the guest directory")
        root = _absolute(context, first.guest_dir)

        def fail(why: str):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"put_tree: {why}")

        writer = TreeWriter(root, fail=fail)
        try:
            _make_dirs(root)
            for msg in request_iterator:
                writer.add(msg.entry)
            writer.finish()
        except OSError as exc:
            abort_os(context, exc, exc.filename if isinstance(exc.filename, str) else writer.path)
        finally:
            writer.close()
        return pb.PutResponse(bytes=writer.bytes, entries=writer.entries)

    def GetTree(self, request, context):  # noqa: N802
        root = _absolute(context, request.guest_dir)
        try:
            if not os.path.isdir(root):
                os.stat(root)  # ENOENT if missing
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), root)
            yield from walk_tree(root)
        except OSError as exc:
            abort_os(context, exc, exc.filename if isinstance(exc.filename, str) else root)


def _net_identity(net: dict) -> tuple:
    return (net["mac"], net["ipv4"], int(net["prefix"]), net.get("gateway") or None, net.get("gateway_mac"))


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def _popen(argv: list[str], request, *, stdin: bool) -> subprocess.Popen:
    """A program for Exec and Spawn: the agent's environment plus the request's,
    its own session (so a timeout kills its whole group), output on pipes."""
    env = dict(CHILD_ENV)
    env.update(request.env)
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=request.cwd or "/",
        env=env,
        start_new_session=True,
    )


# --- background processes ------------------------------------------------------


class Stream:
    """The newest ``limit`` bytes of one output pipe and how many it produced."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.total = 0  # bytes produced; buf holds [total - len(buf), total)

    def append(self, data: bytes) -> None:
        self.buf += data
        self.total += len(data)
        if len(self.buf) > self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def since(self, offset: int, max_bytes: int) -> tuple[bytes, int]:
        start = max(offset, self.total - len(self.buf))
        at = start - (self.total - len(self.buf))
        return bytes(self.buf[at : at + max_bytes]), start


class GuestProcess:
    """A spawned process: reader threads fill bounded buffers, a waiter reaps it."""

    def __init__(self, proc: subprocess.Popen, limit: int, stdin: bytes | None) -> None:
        self.proc = proc
        self.cond = threading.Condition()
        self.streams = (Stream(limit), Stream(limit))
        self.returncode: int | None = None
        self.readers = [threading.Thread(target=self._read, args=(pipe, s), daemon=True)
                        for pipe, s in zip((proc.stdout, proc.stderr), self.streams)]
        for t in self.readers:
            t.start()
        if stdin is not None:
            threading.Thread(target=self._feed, args=(stdin,), daemon=True).start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _feed(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
        except OSError:
            pass  # it closed its stdin or exited
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _read(self, pipe, stream: Stream) -> None:
        fd = pipe.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self.cond:
                if data:
                    stream.append(data)
                self.cond.notify_all()
            if not data:
                pipe.close()
                return

    def _wait(self) -> None:
        code = self.proc.wait()
        for t in self.readers:  # what it wrote before exiting; bounded, a child may hold the pipe
            t.join(1.0)
        with self.cond:
            self.returncode = code
            self.cond.notify_all()

    def state(self, out_off: int, err_off: int, wait_s: float, max_bytes: int):
        out, err = self.streams
        with self.cond:
            self.cond.wait_for(
                lambda: self.returncode is not None or out.total > out_off or err.total > err_off,
                timeout=min(max(wait_s, 0.0), MAX_WAIT_S),
            )
            out_data, out_start = out.since(out_off, max_bytes)
            err_data, err_start = err.since(err_off, max_bytes)
            return pb.ProcessState(
                exited=self.returncode is not None, returncode=self.returncode or 0,
                stdout=out_data, stdout_start=out_start, stdout_total=out.total,
                stderr=err_data, stderr_start=err_start, stderr_total=err.total,
            )


class GuestProcesses:
    """The process RPCs; one record per spawned process, bounded in number."""

    def __init__(self) -> None:
        self.procs: dict[int, GuestProcess] = {}
        self.procs_lock = threading.Lock()

    def _process(self, pid: int, context) -> GuestProcess:
        with self.procs_lock:
            p = self.procs.get(pid)
        if p is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no spawned process with pid {pid}")
        return p

    def Spawn(self, request, context):  # noqa: N802
        argv = list(request.argv)
        if not argv:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "argv is empty")
        limit = min(request.output_limit or OUTPUT_LIMIT, MAX_OUTPUT_LIMIT)
        try:
            proc = _popen(argv, request, stdin=request.has_stdin)
        except OSError as exc:
            abort_os(context, exc, exc.filename if isinstance(exc.filename, str) else argv[0])
        p = GuestProcess(proc, limit, request.stdin if request.has_stdin else None)
        with self.procs_lock:
            self.procs[proc.pid] = p
            if len(self.procs) > MAX_PROCESSES:
                for pid in [pid for pid, q in self.procs.items() if q.returncode is not None]:
                    del self.procs[pid]
                    if len(self.procs) <= MAX_PROCESSES:
                        break
        return pb.SpawnResponse(pid=proc.pid)

    def ReadProcess(self, request, context):  # noqa: N802
        p = self._process(request.pid, context)
        return p.state(request.stdout_offset, request.stderr_offset, request.wait_s,
                       min(request.max_bytes or CHUNK, CHUNK))

    def SignalProcess(self, request, context):  # noqa: N802
        p = self._process(request.pid, context)
        with p.cond:
            if p.returncode is not None:
                return pb.SignalProcessResponse(delivered=False)
            try:  # not yet reaped (the waiter sets returncode), so the pid is still this process
                (os.killpg if request.group else os.kill)(request.pid, request.signal)
            except ProcessLookupError:
                return pb.SignalProcessResponse(delivered=False)
            except OSError as exc:
                abort_os(context, exc, f"pid {request.pid}")
        return pb.SignalProcessResponse(delivered=True)


class Agent(GuestFiles, GuestProcesses, pb_grpc.AgentServicer):
    def __init__(self) -> None:
        GuestProcesses.__init__(self)
        params = cmdline_params()
        self.nonce = os.urandom(mbx.NONCE_SIZE)
        self.system = GuestMailbox(mbx.SYSTEM_MAILBOX, self.nonce)
        names = [n for n in params.get("mailboxes", "").split(",") if n]
        self.user = {n: GuestMailbox(n, self.nonce) for n in names}
        self.generation = 0
        self.token = ""
        self.kernel = os.uname().release
        self.urandom = os.open("/dev/urandom", os.O_WRONLY)
        os.makedirs(MAILBOX_DIR, exist_ok=True)
        self.evt = os.open(find_port(PORT_EVT), os.O_RDWR)
        self.bridge = Bridge(find_port(PORT_CTL))
        self.evt_lock = threading.Lock()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ipr = IPRoute()
        self.net_lock = threading.Lock()
        self.fast_ok = False
        self.applied: tuple | None = None  # the network config eth0 carries now
        self.warm_network()

    # --- events to the host ------------------------------------------------

    def emit(self, **fields: object) -> None:
        line = b"vmfork-evt " + b" ".join(f"{k}={v}".encode() for k, v in fields.items()) + b"\n"
        with self.evt_lock:
            os.write(self.evt, line)

    # --- resume ------------------------------------------------------------

    def resume_loop(self) -> None:
        while True:
            data = os.read(self.evt, 64)
            if not data:  # no host listening (boot only)
                time.sleep(0.05)
                continue
            if DOORBELL in data:
                try:
                    self.on_resume()
                except Exception as exc:  # report, never die: the host waits for a line
                    self.emit(event="error", stage="resume", detail=type(exc).__name__)
                    log(f"resume failed: {exc!r}")

    def on_resume(self) -> None:
        t0 = time.monotonic()
        got = self.system.take()
        if got is None:
            self.emit(event="error", stage="resume", detail="no-new-generation")
            return
        cfg = json.loads(got.data)
        entropy = bytes.fromhex(cfg["entropy"])
        os.write(self.urandom, entropy)
        fcntl.ioctl(self.urandom, RNDRESEEDCRNG)
        random.seed(entropy)
        if "time_ns" in cfg:
            time.clock_settime_ns(time.CLOCK_REALTIME, int(cfg["time_ns"]))
        self.generation = int(cfg["gen"])
        self.token = cfg.get("token", "")
        net = cfg.get("net")
        if net:
            try:
                path = self.apply_on_resume(net)
                self.ack(net, mailbox=mbx.SYSTEM_MAILBOX, ip=net["ipv4"], path=path)
            except Exception as exc:  # no ack: the host falls back to ReconfigureNetwork
                log(f"network handoff failed: {exc!r}")
        acks = cfg.get("acks", {})
        for mb in self.user.values():
            delivery = mb.take()
            if delivery is not None:
                self.deliver(mb, delivery, acks.get(mb.name), net)
        self.emit(event="ready", gen=self.generation, resume_ms=f"{(time.monotonic() - t0) * 1e3:.2f}")
        log(f"resumed as fork generation {self.generation}")  # after the signal: off the hot path

    def deliver(self, mb: GuestMailbox, delivery: mbx.Delivery, ack: str | None, net: dict | None) -> None:
        """Publish a payload at /run/vmfork/mailbox/<name>.json (atomically).

        ``ack`` is "agent" (acknowledge on delivery), "guest" (a guest program
        acknowledges when it has applied the payload: it sends the datagram
        written to <name>.ack, e.g. with ``vmfork-ack <name>``) or None.
        """
        mb.payload = delivery.data
        mb.generation = self.generation
        path = f"{MAILBOX_DIR}/{mb.name}.json"
        _atomic_write(path, delivery.data)
        if ack and net:
            datagram = mbx.format_ack(stage="applied", mailbox=mb.name, gen=self.generation, token=self.token)
            if ack == "guest":
                _atomic_write(f"{MAILBOX_DIR}/{mb.name}.ack",
                              f"{net['ack_host']} {net['ack_port']} ".encode() + datagram + b"\n")
            else:
                self.udp.sendto(datagram, (net["ack_host"], int(net["ack_port"])))

    # --- network ---------------------------------------------------------------

    def warm_network(self) -> None:
        """Run the apply path once at boot so every lazy import and cache inside
        pyroute2 is already in the snapshot; forks then only pay TCG translation."""
        try:
            self.eth = self.ipr.link_lookup(ifname="eth0")[0]
        except IndexError:
            self.eth = None
            return
        mac = self.ipr.get_links(self.eth)[0].get_attr("IFLA_ADDRESS")
        self.apply_network({"mac": mac, "ipv4": "169.254.77.77", "prefix": 32, "gateway": None})
        self.ipr.addr("del", index=self.eth, address="169.254.77.77", prefixlen=32)
        self.ipr.link("set", index=self.eth, state="down")
        self.applied = None
        self.fast = FastNetlink(self.eth)
        self.fast_ok = True  # a fresh fork's eth0: down, no address, no neighbours

    def apply_on_resume(self, net: dict) -> str:
        """The guest-initiated handoff; returns which path applied it. A resume
        that brings the config already applied (a pre-warmed pool fork's second
        resume, vm.deliver()) changes nothing and only acks."""
        if _net_identity(net) == self.applied:
            return "unchanged"
        if self.fast_ok:
            self.fast_ok = False  # this memory now carries an applied config
            try:
                with self.net_lock:
                    self.fast.apply(net["mac"], net["ipv4"], int(net["prefix"]), net.get("gateway"),
                                    net.get("gateway_mac"))
                    self.applied = _net_identity(net)
                return "fast"
            except OSError as exc:
                log(f"fast netlink apply failed ({exc}); using pyroute2")
        self.apply_network(net)
        return "pyroute2"

    def apply_network(self, net: dict) -> None:
        """MAC, address, link, default route, stale neighbours: all over netlink."""
        if self.eth is None:
            raise RuntimeError("the guest has no eth0")
        self.fast_ok = False
        with self.net_lock:
            self.applied = None  # until it all went through
            ipr, idx = self.ipr, self.eth
            ipr.link("set", index=idx, address=net["mac"])
            for addr in ipr.get_addr(index=idx, family=socket.AF_INET):
                ipr.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            ipr.addr("add", index=idx, address=net["ipv4"], prefixlen=int(net["prefix"]))
            ipr.link("set", index=idx, state="up")
            if net.get("gateway"):
                ipr.route("replace", dst="0.0.0.0/0", gateway=net["gateway"], oif=idx)
            for neigh in ipr.get_neighbours(ifindex=idx):
                ipr.neigh("del", ifindex=idx, dst=neigh.get_attr("NDA_DST"))
            if net.get("gateway") and net.get("gateway_mac"):
                _mac_bytes(net["gateway_mac"])  # a malformed MAC fails here, not inside netlink
                ipr.neigh("replace", ifindex=idx, dst=net["gateway"], lladdr=net["gateway_mac"],
                          state=NUD_REACHABLE)
            self.applied = _net_identity(net)

    def ack(self, net: dict, **fields: object) -> None:
        datagram = mbx.format_ack(stage="applied", gen=self.generation, token=self.token, **fields)
        self.udp.sendto(datagram, (net["ack_host"], int(net["ack_port"])))

    # --- gRPC ---------------------------------------------------------------

    def Health(self, request, context):  # noqa: N802 (gRPC names)
        return pb.HealthResponse(
            healthy=True,
            generation=self.generation,
            agent_version=AGENT_VERSION,
            uptime_s=time.monotonic() - START,
            kernel_release=self.kernel,
        )

    def Describe(self, request, context):  # noqa: N802
        boxes = [self.system, *self.user.values()]
        return pb.DescribeResponse(
            nonce=self.nonce,
            mailboxes=[pb.MailboxInfo(name=b.name, guest_phys_addr=b.phys, size=b.size) for b in boxes],
            agent_version=AGENT_VERSION,
            kernel_release=self.kernel,
            generation=self.generation,
        )

    def ReadMailbox(self, request, context):  # noqa: N802
        mb = self.user.get(request.name)
        if mb is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no mailbox named {request.name!r}")
        return pb.ReadMailboxResponse(payload=mb.payload, generation=mb.generation)

    def ReconfigureNetwork(self, request, context):  # noqa: N802
        t0 = time.monotonic()
        net = {"mac": request.mac, "ipv4": request.ipv4, "prefix": request.prefix,
               "gateway": request.gateway}
        self.apply_network(net)
        return pb.ReconfigureNetworkResponse(apply_ms=(time.monotonic() - t0) * 1e3)

    def Exec(self, request, context):  # noqa: N802
        """Run a program; stdout and stderr are each kept up to the request's
        ``output_limit`` (default 8 MiB): the rest is read and dropped (so the
        program never blocks on a full pipe), counted, and marked at the end."""
        import selectors

        t0 = time.monotonic()
        argv = list(request.argv)
        if not argv:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "argv is empty")
        limit = request.output_limit or EXEC_OUTPUT_LIMIT
        try:
            # No input: /dev/null (EOF at once, like a closed pipe) and no feeder thread,
            # one thread fewer to create on the first exec of a fork.
            proc = _popen(argv, request, stdin=bool(request.stdin))
        except OSError as exc:
            msg = f"vmfork-agent: cannot execute {argv[0]!r}: {exc.strerror}\n".encode()
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return pb.ExecResponse(exit_code=code, stderr=msg, duration_ms=(time.monotonic() - t0) * 1e3)
        spawn_ms = (time.monotonic() - t0) * 1e3

        def feed(data: bytes) -> None:  # like communicate(): stdin from a thread, EPIPE ignored
            try:
                proc.stdin.write(data)
            except (BrokenPipeError, OSError):
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        if request.stdin:
            threading.Thread(target=feed, args=(request.stdin,), daemon=True).start()
        kept = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        for fd in kept:  # fewer, larger reads (and wake-ups) for a chatty program
            try:
                fcntl.fcntl(fd, 1031, 1 << 20)  # F_SETPIPE_SZ
            except OSError:
                pass
        dropped = dict.fromkeys(kept, 0)
        sel = selectors.DefaultSelector()
        for fd in kept:
            sel.register(fd, selectors.EVENT_READ)
        deadline = t0 + request.timeout_s if request.timeout_s else None
        timed_out = False
        null = os.open("/dev/null", os.O_WRONLY)
        while sel.get_map():
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = sel.select(wait)
            if not events:
                if timed_out:  # killed, yet a detached child still holds the pipes
                    break
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 5
                continue
            for key, _ in events:
                room = limit - len(kept[key.fd])
                if room > 0:
                    chunk = os.read(key.fd, 1 << 20)
                    got = len(chunk)
                    kept[key.fd] += chunk[:room]
                    dropped[key.fd] += max(got - room, 0)
                else:  # past the cap: drop in the kernel, without copying
                    got = os.splice(key.fd, null, 1 << 30)
                    dropped[key.fd] += got
                if not got:
                    sel.unregister(key.fd)
        sel.close()
        os.close(null)
        proc.stdout.close()
        proc.stderr.close()
        proc.wait()
        (out_fd, out), (err_fd, err) = kept.items()  # stdout first: the order registered
        for fd, buf in ((out_fd, out), (err_fd, err)):
            if dropped[fd]:
                what = "stdout" if fd == out_fd else "stderr"
                buf += (f"\n[vmfork: {what} truncated at {limit} bytes (output_limit); "
                        f"{dropped[fd]} more bytes dropped]\n").encode()
        return pb.ExecResponse(
            exit_code=proc.returncode,
            stdout=bytes(out),
            stderr=bytes(err),
            timed_out=timed_out,
            duration_ms=(time.monotonic() - t0) * 1e3,
            stdout_dropped=dropped[out_fd],
            stderr_dropped=dropped[err_fd],
            spawn_ms=spawn_ms,
        )


    def Shell(self, request_iterator, context):  # noqa: N802
        """A program on a PTY: keystrokes in, terminal output out (vmfork shell)."""
        first = next(request_iterator, None)
        if first is None:
            return
        argv = list(first.argv) or (["/bin/bash", "-l"] if os.path.exists("/bin/bash") else ["/bin/sh", "-l"])
        pid, master = pty.fork()  # the child: a new session with the PTY as its controlling tty
        if pid == 0:
            try:
                env = dict(CHILD_ENV, TERM=first.term or "xterm", HOME="/root")
                os.chdir("/root")
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)

        def resize(rows, cols):
            if rows and cols:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", min(rows, 10000), min(cols, 10000), 0, 0))

        def pump_in():
            try:
                resize(first.rows, first.cols)
                for msg in request_iterator:
                    resize(msg.rows, msg.cols)
                    data = msg.data[:SHELL_CHUNK]
                    while data:
                        data = data[os.write(master, data):]
            except Exception:  # the client went away or the program ended
                pass
            with contextlib.suppress(ProcessLookupError):  # the host hung up: like a closed terminal
                os.kill(pid, signal.SIGHUP)  # (a zombie ignores it; a reaped pid is gone)

        threading.Thread(target=pump_in, name="shell-in", daemon=True).start()
        status = None
        try:
            while True:
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        data = os.read(master, SHELL_CHUNK)
                    except OSError:  # EIO: every slave fd closed
                        data = b""
                    if data:
                        yield pb.ShellOutput(data=data)
                        continue
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = st
                    break
                if ready:  # EOF but the program lives on (it closed its tty): wait for it
                    _, status = os.waitpid(pid, 0)
                    break
        finally:
            if status is None:  # the stream was cancelled
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
                _, status = os.waitpid(pid, 0)
            os.close(master)
        yield pb.ShellOutput(exited=True, exit_code=os.waitstatus_to_exitcode(status))


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def main() -> None:
    os.makedirs(RUN_DIR, exist_ok=True)
    try:
        os.unlink(GRPC_SOCK)
    except FileNotFoundError:
        pass
    agent = Agent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))  # long polls and transfers hold threads
    pb_grpc.add_AgentServicer_to_server(agent, server)
    server.add_insecure_port("unix:" + GRPC_SOCK)
    server.start()
    agent.bridge.replenish()  # the first session's connection, accepted before the host asks
    threading.Thread(target=agent.bridge.run, name="bridge", daemon=True).start()
    threading.Thread(target=agent.resume_loop, name="resume", daemon=True).start()
    log(f"ready: version {AGENT_VERSION}, kernel {agent.kernel}, mailboxes {sorted(agent.user)}")
    agent.emit(event="ready", gen=0, boot_ms=f"{(time.monotonic() - START) * 1e3:.0f}")
    server.wait_for_termination()


if __name__ == "__main__":
    main()
