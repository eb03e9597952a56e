#!/usr/bin/env python3
"""pytest-vmfork guest agent: PID-1's long-lived helper inside every VM.

It serves the ``Agent`` service of pytest_vmfork/proto/agent.proto over one
virtio-serial port, owns the mailboxes the host patches into memory, and on
every resume (fork) it reseeds randomness, sets the clock, delivers mailbox
payloads, applies the network handoff and then tells the host it is ready.

Channels (both virtio-serial, so neither depends on the guest's network):
- ``org.vmfork.ctl``: length-prefixed protobuf messages multiplexed by stream
  id (pytest_vmfork/channel.py; docs/protocol.md is the specification).
- ``org.vmfork.evt``: line events to the host (``vmfork-evt event=ready ...``);
  from the host, a single doorbell byte queued *before* the vCPUs resume, so
  the loop's ``select`` returns the moment the fork runs. No polling and no
  host-to-guest request on the resume path.

One selector loop serves both ports, every program's pipes and exit (a pidfd)
and every timer; a thread runs only what must block (reading a file or tree
out, the pyroute2 network fallback). Programs start with ``posix_spawn``.

The resume path runs under TCG in a freshly started QEMU that must translate
every guest instruction again, so it is kept short: no imports, no logging to
the console, pre-opened file descriptors, pre-built objects.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import heapq
import json
import mmap
import os
import pty
import select
import selectors
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
import time

from pyroute2 import IPRoute

from pytest_vmfork import channel as ch
from pytest_vmfork import mailbox as mbx
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.tree import TreeWriter

AGENT_VERSION = "2"
PORT_CTL = "org.vmfork.ctl"
PORT_EVT = "org.vmfork.evt"
RUN_DIR = "/run/vmfork"
MAILBOX_DIR = RUN_DIR + "/mailbox"
DOORBELL = b"R"
RNDRESEEDCRNG = 0x5207
NUD_REACHABLE = 0x02
F_SETPIPE_SZ = 1031
CHILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
START = time.monotonic()
CHUNK = ch.CHUNK  # file content per message
OUTPUT_LIMIT = 1 << 20  # default bytes kept per spawned process stream
EXEC_OUTPUT_LIMIT = 8 << 20  # default bytes kept of an exec's stdout and of its stderr
MAX_OUTPUT_LIMIT = 64 << 20
MAX_PROCESSES = 1024  # records kept; the oldest exited ones go first
MAX_WAIT_S = 10.0  # a ReadProcess long poll waits at most this long
EXIT_DRAIN_S = 1.0  # after a spawned program exits, output still in its pipes is awaited this long
KILL_GRACE_S = 5.0  # after an exec's timeout kill, its pipes get this long to close
SHELL_CHUNK = 65536  # bytes per PTY read or write
READ_SIZE = 1 << 16
SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores these; a program gets the defaults
_libc = ctypes.CDLL(None, use_errno=True)

try:  # non-blocking: a stalled serial console must never stall the agent
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



class FastNetlink:
    """The resume path's network apply: three rtnetlink requests built at boot.

    pyroute2 builds the messages once, with placeholder values; on resume only
    the MAC, address, prefix and gateway bytes are patched in and the requests
    go out on a plain netlink socket. A cold pyroute2 apply in a freshly
    restored TCG guest costs ~250 ms (every code path is translated again);
    this costs a few. The full pyroute2 path remains for the host's fallback
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

    def apply(self, mac: str, ip: str, prefix: int, gateway: str | None, gateway_mac: str | None,
              marks: list) -> None:
        """Each request's end is appended to ``marks`` (net.link, net.addr, net.route, net.neigh)."""
        link, addr, route, neigh = self.msgs
        link = self._patch(link, _mac_bytes(self.MAC), _mac_bytes(mac))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = addr[:17] + bytes([prefix]) + addr[18:]  # ifa_prefixlen follows nlmsghdr and ifa_family
        batch = [("net.link", link), ("net.addr", addr)]
        if gateway:
            route = self._patch(route, socket.inet_aton(self.GW), socket.inet_aton(gateway))
            batch.append(("net.route", route))
            if gateway_mac:  # the host's bridge: the ack needs no ARP round trip (nor the RX path)
                neigh = self._patch(neigh, socket.inet_aton(self.GW), socket.inet_aton(gateway))
                neigh = self._patch(neigh, _mac_bytes(self.GW_MAC), _mac_bytes(gateway_mac))
                batch.append(("net.neigh", neigh))
        for stage, msg in batch:
            self.seq += 1
            msg = msg[:8] + struct.pack("<I", self.seq) + msg[12:]
            self.sock.send(msg)
            reply = self.sock.recv(65536)
            mtype, = struct.unpack_from("<H", reply, 4)
            error, = struct.unpack_from("<i", reply, 16)
            if mtype != 2 or error != 0:  # NLMSG_ERROR carrying 0 is the ack
                raise OSError(-error, f"rtnetlink request {struct.unpack_from('<H', msg, 4)[0]} failed")
            marks.append((stage, time.monotonic()))


# --- calls --------------------------------------------------------------------

_ERRNO_CODE = {
    errno.ENOENT: "NOT_FOUND",
    errno.EACCES: "PERMISSION_DENIED",
    errno.EPERM: "PERMISSION_DENIED",
    errno.EROFS: "PERMISSION_DENIED",
    errno.ENOSPC: "RESOURCE_EXHAUSTED",
    errno.EDQUOT: "RESOURCE_EXHAUSTED",
}


class CallError(Exception):
    """A call's failure, sent to the host as an ``Error`` message."""

    def __init__(self, code: str, message: str, errno_name: str = "", path: str = "") -> None:
        super().__init__(message)
        self.error = pb.Error(code=code, message=message, errno=errno_name, path=path)


def os_error(exc: OSError, path: str) -> CallError:
    """The errno name and the guest path the host reports (GuestFileError)."""
    code = exc.errno or errno.EIO
    name = errno.errorcode.get(code, str(code))
    return CallError(_ERRNO_CODE.get(code, "FAILED_PRECONDITION"),
                     f"{path}: {exc.strerror or os.strerror(code)} ({name})", name, path)


def invalid(message: str) -> CallError:
    return CallError("INVALID_ARGUMENT", message)


def _absolute(path: str) -> str:
    if not path.startswith("/") or "\0" in path:
        raise invalid(f"guest path {path!r} is not absolute")
    return os.path.normpath(path)


class Call:
    """One stream of the channel. Replies go out only while the stream is open
    and its session is the agent's (a fork drops whatever its snapshot had in flight)."""

    def __init__(self, agent: Agent, stream: int) -> None:
        self.agent, self.stream, self.session = agent, stream, agent.session
        self.done = False

    @property
    def live(self) -> bool:
        return not self.done and self.session == self.agent.session

    def send(self, kind: int, payload: bytes = b"") -> None:
        if not self.live:
            return
        if kind != ch.DATA:
            self.done = True
            self.agent.streams.pop(self.stream, None)
        self.agent.write(ch.encode(kind, self.session, self.stream, payload))

    def finish(self, reply=None) -> None:
        self.send(ch.END, reply.SerializeToString() if reply is not None else b"")

    def fail(self, exc: CallError) -> None:
        self.send(ch.ERROR, exc.error.SerializeToString())

    # Request messages after the first (client-streaming methods), the request
    # side's end, the host abandoning the stream; the defaults suit one-request calls.
    def data(self, payload: bytes) -> None:
        raise invalid("this method takes a single request")

    def end(self) -> None:
        pass

    def cancel(self) -> None:
        self.done = True


# --- programs -----------------------------------------------------------------


def _env(extra) -> dict[str, str]:
    env = dict(CHILD_ENV)
    env.update(extra)
    return env


def start_program(argv: list[str], env_extra, cwd: str, stdin: int, stdout: int,
                  stderr: int) -> tuple[int, object]:
    """Start a program in its own session (a timeout kills its whole group) with
    the given descriptors as 0, 1, 2: ``posix_spawn`` (no fork of the agent), or
    subprocess where posix_spawn cannot (a working directory). Returns (pid, the
    Popen object to keep, or None)."""
    env = _env(env_extra)
    if cwd and cwd != "/":
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
                                start_new_session=True)
        return proc.pid, proc
    dup2 = os.POSIX_SPAWN_DUP2
    actions = [(dup2, stdin, 0), (dup2, stdout, 1), (dup2, stderr, 2)]
    path = argv[0]
    if "/" not in path and "PATH" in env_extra:  # searched in the program's PATH, like subprocess
        for d in env["PATH"].split(":"):
            cand = os.path.join(d or ".", path)
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                path = cand
                break
    pid = os.posix_spawnp(path, argv, env, file_actions=actions, setsid=True, setsigdef=SIGDEF)
    return pid, None


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w


class Feeder:
    """Writes a program's stdin from the loop, then closes it (EPIPE ignored, like communicate())."""

    def __init__(self, agent: Agent, fd: int, data: bytes) -> None:
        self.agent, self.fd, self.view = agent, fd, memoryview(data)
        os.set_blocking(fd, False)
        self.ready(fd, 0)
        if self.fd >= 0:
            agent.sel.register(fd, selectors.EVENT_WRITE, self.ready)

    def ready(self, fd: int, _events: int) -> None:
        try:
            while self.view:
                self.view = self.view[os.write(fd, self.view[:SHELL_CHUNK]):]
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            try:
                self.agent.sel.unregister(self.fd)
            except (KeyError, ValueError):
                pass
            os.close(self.fd)
            self.fd = -1


class Program:
    """A started program as the loop sees it: its output pipes and its pidfd.
    ``on_output(which, data)`` gets output (empty: that pipe closed); ``on_exit(code)``
    the exit status, once reaped."""

    def __init__(self, agent: Agent, argv: list[str], req, stdin_data: bytes | None, on_output,
                 on_exit) -> None:
        self.agent, self.on_output, self.on_exit = agent, on_output, on_exit
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        in_r, in_w = (os.pipe2(os.O_CLOEXEC) if stdin_data is not None else (agent.devnull, -1))
        try:
            self.pid, self.popen = start_program(argv, req.env, req.cwd, in_r, out_w, err_w)
        except BaseException:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_r != agent.devnull:
                os.close(in_r)
        self.returncode: int | None = None
        self.pipes = {out_r: 0, err_r: 1}
        self.grown: set[int] = set()
        for fd in (out_r, err_r):
            agent.sel.register(fd, selectors.EVENT_READ, self.readable)
        self.pidfd = os.pidfd_open(self.pid)
        agent.sel.register(self.pidfd, selectors.EVENT_READ, self.exited)
        self.feeder = Feeder(agent, in_w, stdin_data) if stdin_data is not None else None

    def readable(self, fd: int, _events: int) -> None:
        which = self.pipes[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close_pipe(fd)
        elif len(data) == READ_SIZE and fd not in self.grown:  # a chatty program: fewer, larger reads
            self.grown.add(fd)  # (not up front: a small command's first run skips the kernel's resize)
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
        self.on_output(which, data, fd)

    def close_pipe(self, fd: int) -> None:
        if self.pipes.pop(fd, None) is not None:
            self.agent.sel.unregister(fd)
            os.close(fd)

    def exited(self, fd: int, _events: int) -> None:
        self.reap()
        self.on_exit(self.returncode)

    def reap(self) -> None:
        """Collect the exit status (the pidfd said it exited, or it was killed)."""
        if self.pidfd >= 0:
            self.agent.sel.unregister(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        if self.popen is not None:
            self.popen.returncode = self.returncode  # reaped here: subprocess must not wait for it
        if self.feeder is not None:
            self.feeder.close()

    def close(self) -> None:
        for fd in list(self.pipes):
            self.close_pipe(fd)


class ExecCall(Call):
    """Run a program to completion; stdout and stderr are each kept up to the
    request's ``output_limit`` (default 8 MiB): the rest is read and dropped
    (so the program never blocks on a full pipe), counted, and marked at the end."""

    def start(self, req) -> None:
        t0 = time.monotonic()
        self.t0 = t0
        argv = list(req.argv)
        if not argv:
            raise invalid("argv is empty")
        self.limit = req.output_limit or EXEC_OUTPUT_LIMIT
        self.kept = (bytearray(), bytearray())
        self.dropped = [0, 0]
        self.timed_out = False
        self.timer = None
        try:
            # No input: /dev/null (EOF at once, like a closed pipe) and no feeder.
            stdin = req.stdin if req.stdin else None
            self.prog = Program(self.agent, argv, req, stdin, self.output, self.exit)
        except OSError as exc:
            msg = f"vmfork-agent: cannot execute {argv[0]!r}: {exc.strerror}\n".encode()
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            took = (time.monotonic() - t0) * 1e3
            self.finish(pb.ExecResponse(exit_code=code, stderr=msg, duration_ms=took))
            return
        self.spawn_ms = (time.monotonic() - t0) * 1e3
        if req.timeout_s:
            self.timer = self.agent.call_later(req.timeout_s, self.expire)

    def output(self, which: int, data: bytes, fd: int) -> None:
        if not data:
            self.maybe_done()
            return
        buf = self.kept[which]
        room = self.limit - len(buf)
        if room >= len(data):
            buf += data
            return
        if room > 0:
            buf += data[:room]
        self.dropped[which] += len(data) - max(room, 0)
        try:  # past the cap: drop what is queued in the kernel, without copying
            while got := os.splice(fd, self.agent.devnull_w, 1 << 30, flags=os.SPLICE_F_NONBLOCK):
                self.dropped[which] += got
        except (BlockingIOError, OSError):
            pass

    def exit(self, code: int) -> None:
        self.maybe_done()

    def expire(self) -> None:
        self.timer = None
        if self.timed_out:  # killed, yet a detached child still holds the pipes
            self.prog.close()
            self.complete()
            return
        self.timed_out = True
        try:
            os.killpg(self.prog.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.timer = self.agent.call_later(KILL_GRACE_S, self.expire)

    def maybe_done(self) -> None:
        if self.live and not self.prog.pipes and self.prog.returncode is not None:
            self.complete()

    def complete(self) -> None:
        if self.timer is not None:
            self.agent.cancel_timer(self.timer)
            self.timer = None
        if self.prog.returncode is None:  # only after a timeout: the kill is under way
            self.prog.reap()
        out, err = self.kept
        for which, buf in ((0, out), (1, err)):
            if self.dropped[which]:
                what = ("stdout", "stderr")[which]
                buf += (f"\n[vmfork: {what} truncated at {self.limit} bytes (output_limit); "
                        f"{self.dropped[which]} more bytes dropped]\n").encode()
        self.finish(pb.ExecResponse(
            exit_code=self.prog.returncode or 0, stdout=bytes(out), stderr=bytes(err),
            timed_out=self.timed_out,
            duration_ms=(time.monotonic() - self.t0) * 1e3, stdout_dropped=self.dropped[0],
            stderr_dropped=self.dropped[1], spawn_ms=self.spawn_ms,
        ))


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


class Waiter:
    """A ReadProcess long poll: answered on news or at its timer."""

    def __init__(self, call: Call, out_off: int, err_off: int, max_bytes: int) -> None:
        self.call, self.out_off, self.err_off, self.max_bytes = call, out_off, err_off, max_bytes
        self.timer: list | None = None


class GuestProcess:
    """A spawned program: its output kept in bounded streams, its long polls waiting."""

    def __init__(self, agent: Agent, argv: list[str], req, limit: int) -> None:
        self.agent = agent
        self.streams = (Stream(limit), Stream(limit))
        self.returncode: int | None = None  # set once reaped and its output drained (or EXIT_DRAIN_S)
        self.waiters: list[Waiter] = []
        self.drain_timer = None
        self.prog = Program(agent, argv, req, req.stdin if req.has_stdin else None, self.output, self.exit)
        self.pid = self.prog.pid

    def output(self, which: int, data: bytes, fd: int) -> None:
        if data:
            self.streams[which].append(data)
        elif not self.prog.pipes and self.prog.returncode is not None:
            self.settle()
        self.wake()

    def exit(self, code: int) -> None:
        if not self.prog.pipes:
            self.settle()
        else:  # what it wrote before exiting; bounded, a child may hold the pipe
            self.drain_timer = self.agent.call_later(EXIT_DRAIN_S, self.settle)
        self.wake()

    def settle(self) -> None:
        if self.drain_timer is not None:
            self.agent.cancel_timer(self.drain_timer)
            self.drain_timer = None
        self.returncode = self.prog.returncode
        self.wake()

    def changed(self, out_off: int, err_off: int) -> bool:
        out, err = self.streams
        return self.returncode is not None or out.total > out_off or err.total > err_off

    def state(self, out_off: int, err_off: int, max_bytes: int):
        out, err = self.streams
        out_data, out_start = out.since(out_off, max_bytes)
        err_data, err_start = err.since(err_off, max_bytes)
        return pb.ProcessState(
            exited=self.returncode is not None, returncode=self.returncode or 0,
            stdout=out_data, stdout_start=out_start, stdout_total=out.total,
            stderr=err_data, stderr_start=err_start, stderr_total=err.total,
        )

    def read(self, call: Call, req) -> None:
        """Answer now if there is news or no wait; else when there is, or at the wait's end."""
        max_bytes = min(req.max_bytes or CHUNK, CHUNK)
        wait_s = min(max(req.wait_s, 0.0), MAX_WAIT_S)
        if wait_s <= 0 or self.changed(req.stdout_offset, req.stderr_offset):
            call.finish(self.state(req.stdout_offset, req.stderr_offset, max_bytes))
            return
        waiter = Waiter(call, req.stdout_offset, req.stderr_offset, max_bytes)
        waiter.timer = self.agent.call_later(wait_s, lambda: self.answer(waiter))
        self.waiters.append(waiter)

    def answer(self, waiter: Waiter) -> None:
        if waiter not in self.waiters:
            return
        self.waiters.remove(waiter)
        self.agent.cancel_timer(waiter.timer)
        waiter.call.finish(self.state(waiter.out_off, waiter.err_off, waiter.max_bytes))

    def wake(self) -> None:
        for waiter in list(self.waiters):
            if not waiter.call.live:
                self.waiters.remove(waiter)
                self.agent.cancel_timer(waiter.timer)
            elif self.changed(waiter.out_off, waiter.err_off):
                self.answer(waiter)


# --- files ------------------------------------------------------------------


class PutFileCall(Call):
    """Write one guest file: a header, then its content; renamed into place at the end."""

    fd = -1
    tmp: str | None = None

    def start(self, first) -> None:
        if first.WhichOneof("msg") != "header":
            raise invalid("PutFile starts with a header")
        h = first.header
        self.path = path = _absolute(h.path)
        parent, name = os.path.split(path)
        self.size = 0
        try:
            _make_dirs(parent)
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
            _write_all(self.fd, data)
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
        root = _absolute(first.guest_dir)

        def fail(why: str):
            raise invalid(f"put_tree: {why}")

        self.writer = TreeWriter(root, fail=fail)
        try:
            _make_dirs(root)
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


# --- the shell ------------------------------------------------------------------


class ShellCall(Call):
    """A program on a PTY (vmfork shell): keystrokes in, terminal output out, the exit status last."""

    def start(self, first) -> None:
        argv = list(first.argv) or (["/bin/bash", "-l"] if os.path.exists("/bin/bash") else ["/bin/sh", "-l"])
        pid, master = pty.fork()  # the child: a new session with the PTY as its controlling tty
        if pid == 0:
            try:
                env = dict(CHILD_ENV, TERM=first.term or "xterm", HOME="/root")
                os.chdir("/root")
                os.execvpe(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.master = pid, master
        self.pending = bytearray()
        self.running = True
        os.set_blocking(master, False)
        self.resize(first)
        self.agent.sel.register(master, selectors.EVENT_READ, self.ready)
        self.pidfd = os.pidfd_open(pid)
        self.agent.sel.register(self.pidfd, selectors.EVENT_READ, self.exited)

    def resize(self, msg) -> None:
        if msg.rows and msg.cols:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                        struct.pack("HHHH", min(msg.rows, 10000), min(msg.cols, 10000), 0, 0))

    def ready(self, fd: int, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush()
        if events & selectors.EVENT_READ:
            self.drain()

    def drain(self) -> None:
        while self.master >= 0:
            try:
                data = os.read(self.master, SHELL_CHUNK)
            except BlockingIOError:
                return
            except OSError:  # EIO: every slave fd closed
                data = b""
            if not data:  # the program closed its tty; its exit comes on the pidfd
                self.agent.sel.unregister(self.master)
                os.close(self.master)
                self.master = -1
                return
            self.send(ch.DATA, pb.ShellOutput(data=data).SerializeToString())

    def flush(self) -> None:
        try:
            while self.pending:
                del self.pending[: os.write(self.master, self.pending[:SHELL_CHUNK])]
        except BlockingIOError:
            pass
        except OSError:
            self.pending.clear()
        if self.master >= 0:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0)
            self.agent.sel.modify(self.master, events, self.ready)

    def data(self, payload: bytes) -> None:
        msg = pb.ShellInput.FromString(payload)
        if self.master < 0:
            return
        self.resize(msg)
        if msg.data:
            self.pending += msg.data[:SHELL_CHUNK]
            self.flush()

    def exited(self, fd: int, _events: int) -> None:
        self.agent.sel.unregister(fd)
        os.close(fd)
        _, status = os.waitpid(self.pid, 0)
        self.running = False
        self.drain()
        if self.master >= 0:
            self.agent.sel.unregister(self.master)
            os.close(self.master)
            self.master = -1
        self.finish(pb.ShellOutput(exited=True, exit_code=os.waitstatus_to_exitcode(status)))

    def hangup(self) -> None:
        if self.running:  # like a closed terminal (a reaped pid is gone: not signalled)
            try:
                os.kill(self.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass

    def end(self) -> None:
        self.hangup()

    def cancel(self) -> None:
        self.done = True
        self.hangup()


# --- the agent --------------------------------------------------------------------


class Agent:
    def __init__(self) -> None:
        params = cmdline_params()
        self.nonce = os.urandom(mbx.NONCE_SIZE)
        self.system = GuestMailbox(mbx.SYSTEM_MAILBOX, self.nonce)
        names = [n for n in params.get("mailboxes", "").split(",") if n]
        self.user = {n: GuestMailbox(n, self.nonce) for n in names}
        self.generation = 0
        self.token = ""
        self.kernel = os.uname().release
        self.urandom = os.open("/dev/urandom", os.O_WRONLY)
        self.devnull = os.open("/dev/null", os.O_RDONLY)
        self.devnull_w = os.open("/dev/null", os.O_WRONLY)
        os.makedirs(MAILBOX_DIR, exist_ok=True)
        self.evt = os.open(find_port(PORT_EVT), os.O_RDWR)
        self.evt_lock = threading.Lock()
        # The channel: one session at a time (0 until the first frame names one).
        self.ctl = os.open(find_port(PORT_CTL), os.O_RDWR | os.O_NONBLOCK)
        self.session = 0
        self.decoder = ch.Decoder(0, ch.MAX_REQUEST)
        self.streams: dict[int, Call] = {}
        self.wlock = threading.Lock()
        self.sel = selectors.DefaultSelector()
        self.timers: list[list] = []
        self.seq = 0
        self.sel.register(self.ctl, selectors.EVENT_READ, self.ctl_readable)
        self.sel.register(self.evt, selectors.EVENT_READ, self.evt_readable)
        self.handlers = {m.id: getattr(self, "rpc_" + m.name) for m in ch.METHODS.values()}
        self.call_types = {ch.METHODS[name].id: cls for name, cls in (
            ("Exec", ExecCall), ("PutFile", PutFileCall), ("PutTree", PutTreeCall), ("Shell", ShellCall))}
        self.procs: dict[int, GuestProcess] = {}
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ipr = IPRoute()
        self.net_lock = threading.Lock()
        self.fast_ok = False
        self.applied: tuple | None = None  # the network config eth0 carries now
        self.warm_network()

    # --- the loop ------------------------------------------------------------

    def call_later(self, delay: float, fn) -> list:
        self.seq += 1
        entry = [time.monotonic() + delay, self.seq, fn, True]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel_timer(entry: list | None) -> None:
        if entry is not None:
            entry[3] = False

    def run(self) -> None:
        timers, select = self.timers, self.sel.select
        while True:
            while timers and not timers[0][3]:
                heapq.heappop(timers)
            events = select(max(timers[0][0] - time.monotonic(), 0.0) if timers else None)
            for key, mask in events:
                try:
                    key.data(key.fd, mask)
                except Exception as exc:  # one broken call must not take the agent down
                    log(f"loop: {exc!r}")
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                entry = heapq.heappop(timers)
                if entry[3]:
                    entry[3] = False
                    try:
                        entry[2]()
                    except Exception as exc:
                        log(f"timer: {exc!r}")

    def pause(self, fd: int, callback) -> None:
        """A port with no host behind it reads EOF at once: look again later (boot only)."""
        self.sel.unregister(fd)
        self.call_later(0.05, lambda: self.sel.register(fd, selectors.EVENT_READ, callback))

    # --- the channel ------------------------------------------------------------

    def write(self, frame: bytes) -> None:
        """Send one frame whole (frames of threads and of the loop never interleave)."""
        view = memoryview(frame)
        with self.wlock:
            while view:
                try:
                    view = view[os.write(self.ctl, view):]
                except BlockingIOError:
                    select.select([], [self.ctl], [], 1.0)

    def ctl_readable(self, fd: int, _mask: int) -> None:
        chunks = []
        for _ in range(256):  # a virtio-serial read returns one 4 KiB buffer: take what is queued
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                break
            if not data:
                if not chunks:
                    self.pause(fd, self.ctl_readable)
                break
            chunks.append(data)
        if not chunks:
            return
        try:
            frames = self.decoder.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        except ch.ProtocolError as exc:
            log(f"channel: {exc}; input dropped")
            self.decoder.reset(self.session)
            return
        self.session = self.decoder.session
        for frame in frames:
            self.on_frame(frame)

    def reset_session(self, session: int) -> None:
        """A fork: whatever the snapshot had in flight belongs to a session no host will read."""
        self.session = session
        self.decoder.reset(session)
        streams, self.streams = self.streams, {}
        for call in streams.values():
            call.cancel()

    def on_frame(self, frame: ch.Frame) -> None:
        kind, stream = frame.kind, frame.stream
        if kind == ch.CALL:
            method = ch.BY_ID.get(frame.method)
            call = self.call_types.get(frame.method, Call)(self, stream)
            if method is None:
                call.fail(invalid(f"unknown method {frame.method}"))
                return
            self.streams[stream] = call
            try:
                self.handlers[method.id](call, method.request.FromString(frame.payload))
            except CallError as exc:
                call.fail(exc)
            except Exception as exc:
                call.fail(CallError("INTERNAL", f"{method.name}: {exc!r}"))
            return
        call = self.streams.get(stream)
        if call is None:
            return  # a stream that ended (e.g. failed mid-put): its later frames are dropped
        try:
            if kind == ch.DATA:
                call.data(frame.payload)
            elif kind == ch.END:
                call.end()
            elif kind == ch.CANCEL:
                self.streams.pop(stream, None)
                call.cancel()
        except CallError as exc:
            call.fail(exc)
        except Exception as exc:
            call.fail(CallError("INTERNAL", repr(exc)))

    # --- events to the host ------------------------------------------------

    def emit(self, **fields: object) -> None:
        line = b"vmfork-evt " + b" ".join(f"{k}={v}".encode() for k, v in fields.items()) + b"\n"
        with self.evt_lock:
            os.write(self.evt, line)

    # --- resume ------------------------------------------------------------

    def evt_readable(self, fd: int, _mask: int) -> None:
        data = os.read(fd, 64)
        if not data:  # no host listening (boot only)
            self.pause(fd, self.evt_readable)
            return
        if DOORBELL in data:
            try:
                self.on_resume()
            except Exception as exc:  # report, never die: the host waits for a line
                self.emit(event="error", stage="resume", detail=type(exc).__name__)
                log(f"resume failed: {exc!r}")

    def on_resume(self) -> None:
        """The doorbell rang: a fork (or the same VM resumed as a new generation).
        Each stage's end is stamped (ms since the doorbell) and reported in the ready event."""
        t0 = time.monotonic()
        marks = []
        got = self.system.take()
        if got is None:
            self.emit(event="error", stage="resume", detail="no-new-generation")
            return
        cfg = json.loads(got.data)
        self.generation = int(cfg["gen"])
        self.token = cfg.get("token", "")
        marks.append(("gen", time.monotonic()))
        session = int(cfg.get("chan", 0))
        if session and session != self.session:
            self.reset_session(session)
            marks.append(("chan", time.monotonic()))
        entropy = bytes.fromhex(cfg["entropy"])
        os.write(self.urandom, entropy)
        fcntl.ioctl(self.urandom, RNDRESEEDCRNG)  # (the agent itself draws on os.urandom only)
        marks.append(("entropy", time.monotonic()))
        if "time_ns" in cfg:
            time.clock_settime_ns(time.CLOCK_REALTIME, int(cfg["time_ns"]))
            marks.append(("clock", time.monotonic()))
        net = cfg.get("net")
        if net:
            try:
                path = self.apply_on_resume(net, marks)
                self.ack(net, mailbox=mbx.SYSTEM_MAILBOX, ip=net["ipv4"], path=path)
                marks.append(("ack", time.monotonic()))
            except Exception as exc:  # no ack: the host falls back to ReconfigureNetwork
                log(f"network handoff failed: {exc!r}")
        acks = cfg.get("acks", {})
        for mb in self.user.values():
            delivery = mb.take()
            if delivery is not None:
                self.deliver(mb, delivery, acks.get(mb.name), net)
        marks.append(("mailboxes", time.monotonic()))
        stages = ",".join(f"{name}:{(t - t0) * 1e3:.2f}" for name, t in marks)
        self.emit(event="ready", gen=self.generation, resume_ms=f"{(time.monotonic() - t0) * 1e3:.2f}",
                  stages=stages)
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

    def apply_on_resume(self, net: dict, marks: list) -> str:
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
                                    net.get("gateway_mac"), marks)
                    self.applied = _net_identity(net)
                return "fast"
            except OSError as exc:
                log(f"fast netlink apply failed ({exc}); using pyroute2")
        self.apply_network(net)
        marks.append(("pyroute2", time.monotonic()))
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

    # --- the service's methods --------------------------------------------------

    def rpc_Health(self, call: Call, req) -> None:  # the schema's names
        call.finish(pb.HealthResponse(healthy=True, generation=self.generation, agent_version=AGENT_VERSION,
                                      uptime_s=time.monotonic() - START, kernel_release=self.kernel))

    def rpc_Describe(self, call: Call, req) -> None:
        boxes = [self.system, *self.user.values()]
        call.finish(pb.DescribeResponse(
            nonce=self.nonce,
            mailboxes=[pb.MailboxInfo(name=b.name, guest_phys_addr=b.phys, size=b.size) for b in boxes],
            agent_version=AGENT_VERSION, kernel_release=self.kernel, generation=self.generation,
        ))

    def rpc_ReadMailbox(self, call: Call, req) -> None:
        mb = self.user.get(req.name)
        if mb is None:
            raise CallError("NOT_FOUND", f"no mailbox named {req.name!r}")
        call.finish(pb.ReadMailboxResponse(payload=mb.payload, generation=mb.generation))

    def rpc_ReconfigureNetwork(self, call: Call, req) -> None:
        """The host's fallback when the handoff's ack did not come: pyroute2, on a thread."""
        net = {"mac": req.mac, "ipv4": req.ipv4, "prefix": req.prefix, "gateway": req.gateway}

        def apply() -> None:
            t0 = time.monotonic()
            try:
                self.apply_network(net)
            except Exception as exc:
                call.fail(CallError("FAILED_PRECONDITION", f"network apply failed: {exc!r}"))
                return
            call.finish(pb.ReconfigureNetworkResponse(apply_ms=(time.monotonic() - t0) * 1e3))

        threading.Thread(target=apply, name="reconfigure", daemon=True).start()

    def rpc_Exec(self, call: ExecCall, req) -> None:
        call.start(req)

    def rpc_PutFile(self, call: PutFileCall, req) -> None:
        call.start(req)

    def rpc_PutTree(self, call: PutTreeCall, req) -> None:
        call.start(req)

    def rpc_Shell(self, call: ShellCall, req) -> None:
        call.start(req)

    def rpc_GetFile(self, call: Call, req) -> None:
        path = _absolute(req.path)
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

    def rpc_GetTree(self, call: Call, req) -> None:
        root = _absolute(req.guest_dir)
        try:
            if not os.path.isdir(root):
                os.stat(root)  # ENOENT if missing
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), root)
        except OSError as exc:
            raise os_error(exc, root) from None
        threading.Thread(target=send_tree, args=(call, root), name="get-tree", daemon=True).start()

    def rpc_Spawn(self, call: Call, req) -> None:
        argv = list(req.argv)
        if not argv:
            raise invalid("argv is empty")
        limit = min(req.output_limit or OUTPUT_LIMIT, MAX_OUTPUT_LIMIT)
        try:
            p = GuestProcess(self, argv, req, limit)
        except OSError as exc:
            raise os_error(exc, exc.filename if isinstance(exc.filename, str) else argv[0]) from None
        self.procs[p.pid] = p
        if len(self.procs) > MAX_PROCESSES:
            for pid in [pid for pid, q in self.procs.items() if q.returncode is not None]:
                del self.procs[pid]
                if len(self.procs) <= MAX_PROCESSES:
                    break
        call.finish(pb.SpawnResponse(pid=p.pid))

    def _process(self, pid: int) -> GuestProcess:
        p = self.procs.get(pid)
        if p is None:
            raise CallError("NOT_FOUND", f"no spawned process with pid {pid}")
        return p

    def rpc_ReadProcess(self, call: Call, req) -> None:
        self._process(req.pid).read(call, req)

    def rpc_SignalProcess(self, call: Call, req) -> None:
        p = self._process(req.pid)
        if p.prog.returncode is not None:  # reaped (only the loop reaps): the pid may be another's now
            call.finish(pb.SignalProcessResponse(delivered=False))
            return
        try:
            (os.killpg if req.group else os.kill)(req.pid, req.signal)
        except ProcessLookupError:
            call.finish(pb.SignalProcessResponse(delivered=False))
            return
        except OSError as exc:
            raise os_error(exc, f"pid {req.pid}") from None
        call.finish(pb.SignalProcessResponse(delivered=True))


def _atomic_write(path: str, data: bytes) -> None:
    """Write beside ``path`` and rename over it; plain system calls, no io objects
    (on the resume path every code path not yet run costs TCG translation)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _net_identity(net: dict) -> tuple:
    return (net["mac"], net["ipv4"], int(net["prefix"]), net.get("gateway") or None, net.get("gateway_mac"))


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def main() -> None:
    os.makedirs(RUN_DIR, exist_ok=True)
    os.chdir("/")
    os.environ["PATH"] = CHILD_ENV["PATH"]  # posix_spawnp searches the agent's own PATH
    agent = Agent()
    log(f"ready: version {AGENT_VERSION}, kernel {agent.kernel}, mailboxes {sorted(agent.user)}")
    agent.emit(event="ready", gen=0, boot_ms=f"{(time.monotonic() - START) * 1e3:.0f}")
    agent.run()


if __name__ == "__main__":
    main()
