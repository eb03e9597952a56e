"""The host end of a VM's control channel to its guest agent (guest/vmfork_agent/).

The channel runs over the VM's ``org.vmfork.ctl`` virtio-serial port, whose
host side is one end of a socketpair QEMU inherits (pytest_vmfork/vm/vmm.py): it
needs no guest address and survives every network change, which is what makes
it the fallback path for the handoff. The framing is pytest_vmfork/channel.py
(specified in docs/protocol.md); this module runs calls over it: one reader
thread per VM hands each frame to the caller waiting on its stream.

Everything from the guest is untrusted: frames are bounded (:data:`MAX_RECEIVE`;
a larger one cuts the VM off), replies are decoded by the schema, error texts are
cut to size, and a stream's queue is bounded, so a guest that floods its channel
costs the host a bounded amount of memory.

Every failure is a GuestError: a call that gets no answer in time an AgentTimeout
(also a TimeoutError), an exec that does not finish an ExecTimeout.
"""

from __future__ import annotations

import errno
import queue
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

from pytest_vmfork import channel as ch
from pytest_vmfork.errors import AgentTimeout, GuestError, GuestFileError
from pytest_vmfork.proto import agent_pb2 as pb

#: Extra seconds the host waits beyond an exec's own guest-side timeout.
EXEC_GRACE_S = 10.0
#: Bytes of stdout and of stderr (each) an exec keeps by default; the guest
#: agent reads and drops the rest and ends the stream with a truncation marker.
DEFAULT_OUTPUT_LIMIT = 8 * 1024 * 1024
#: The largest ``output_limit`` an exec may ask for.
MAX_OUTPUT_LIMIT = 64 * 1024 * 1024
#: Room for the truncation markers and the message framing.
_SLACK = 64 * 1024
#: The largest frame the host accepts from a guest (an exec's reply: two full streams).
MAX_RECEIVE = 2 * MAX_OUTPUT_LIMIT + _SLACK
#: The largest frame of a streamed reply (a file chunk, a tree entry, terminal output).
MAX_STREAM_FRAME = 2 * ch.CHUNK + _SLACK
#: The largest request (exec stdin): what the guest agent accepts in one frame, less the framing.
MAX_SEND = ch.MAX_REQUEST - _SLACK
#: Reply messages of one stream held for its reader; the channel's reader waits for room.
STREAM_QUEUE = 32
#: Seconds the channel's reader waits for a stream's reader to make room before it drops the stream.
STREAM_STALL_S = 60.0
_CLOSED = 0  # a queue item's kind: the channel closed


@dataclass(frozen=True)
class ExecResult:
    """What a program run in the guest returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    duration_ms: float
    stdout_dropped: int = 0  # bytes beyond output_limit the guest dropped (a marker ends stdout)
    stderr_dropped: int = 0
    spawn_ms: float = 0.0  # in the guest: from the request's arrival to the program started

    def check(self) -> ExecResult:
        """Raise GuestError unless the program exited 0 (like ``check=True``)."""
        if self.returncode != 0:
            raise GuestError(
                f"{list(self.argv)} exited with {self.returncode}\n"
                f"stdout: {self.stdout[-2000:]!r}\nstderr: {self.stderr[-2000:]!r}"
            )
        return self


class ExecTimeout(GuestError):
    """An exec did not finish within its timeout; the process was killed."""

    def __init__(self, argv: list[str], timeout: float, stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(
            f"{argv} did not finish within {timeout}s; it was killed"
            + (f"\npartial stdout: {stdout[-500:]!r}" if stdout else "")
            + (f"\npartial stderr: {stderr[-500:]!r}" if stderr else "")
        )
        self.stdout = stdout
        self.stderr = stderr


class AgentClient:
    """Calls to one VM's guest agent over its control channel.

    ``session`` is this channel's random id (docs/protocol.md): the host announces
    it in the system mailbox on every resume, so a fork's guest drops whatever
    its snapshot had in flight. ``on_fault(why)`` is called when the guest breaks
    the framing (the caller kills the VM)."""

    def __init__(self, sock: socket.socket, name: str, on_fault: Callable[[str], None]) -> None:
        self.session = secrets.randbits(32) | 1
        self.closed = False
        self._sock = sock
        self._on_fault = on_fault
        self._decoder = ch.Decoder(self.session, MAX_RECEIVE)
        self._streams: dict[int, tuple[ch.Method, queue.Queue[tuple[int, bytes]]]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._next = 0
        self._reader = threading.Thread(target=self._read, name=f"vmfork-ctl-{name}", daemon=True)
        self._reader.start()

    # --- the channel --------------------------------------------------------------

    def _read(self) -> None:
        buf = bytearray(1 << 20)  # one receive buffer, reused: no allocation per read
        view = memoryview(buf)
        try:
            while n := self._sock.recv_into(buf):
                for frame in self._decoder.feed(view[:n]):
                    self._dispatch(frame)
        except ch.ProtocolError as exc:
            self._on_fault(f"the guest broke the control channel's framing: {exc}")
        except OSError:
            pass  # closed: QEMU exited or the VM is being torn down
        finally:
            self.closed = True
            with self._lock:
                streams = list(self._streams.values())
            for _, q in streams:
                try:
                    q.put_nowait((_CLOSED, b""))
                except queue.Full:
                    pass  # its reader finds the channel closed when the queue drains

    def _dispatch(self, frame: ch.Frame) -> None:
        with self._lock:
            entry = self._streams.get(frame.stream)
        if entry is None:
            return  # a stream given up on (timed out, cancelled): its late frames are dropped
        method, q = entry
        if frame.kind not in (ch.DATA, ch.END, ch.ERROR) or \
                (frame.kind == ch.DATA and not method.server_streaming) or \
                (method.server_streaming and len(frame.payload) > MAX_STREAM_FRAME):
            raise ch.ProtocolError(f"a frame of kind {frame.kind} and {len(frame.payload)} bytes "
                                   f"for a {method.name} call")
        try:
            q.put((frame.kind, frame.payload), timeout=STREAM_STALL_S)
        except queue.Full:
            self._forget(frame.stream)
            self._send_quietly(ch.CANCEL, frame.stream)

    def _open(self, method: ch.Method) -> tuple[int, queue.Queue[tuple[int, bytes]]]:
        q: queue.Queue[tuple[int, bytes]] = queue.Queue(STREAM_QUEUE)
        with self._lock:
            self._next = self._next % 0xFFFFFFFF + 1
            self._streams[self._next] = (method, q)
            return self._next, q

    def _forget(self, stream: int) -> None:
        with self._lock:
            self._streams.pop(stream, None)

    def _send(self, kind: int, stream: int, payload: bytes = b"", method: int = 0,
              deadline: float | None = None) -> None:
        """Write one frame whole; AgentTimeout if the guest takes none of it by ``deadline``."""
        if self.closed:
            raise GuestError("the guest agent's control channel is closed (QEMU exited)")
        view = memoryview(ch.encode(kind, self.session, stream, payload, method))
        writable = select.poll()  # poll, not select: a test process may hold more than 1024 fds
        writable.register(self._sock, select.POLLOUT)
        with self._send_lock:
            while view:
                wait = None if deadline is None else max(deadline - time.monotonic(), 0.0) * 1000
                if not writable.poll(wait):
                    raise AgentTimeout("the guest agent took no request bytes in time")
                try:
                    view = view[self._sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise GuestError(f"the guest agent's control channel is closed: {exc}") from exc

    def _send_quietly(self, kind: int, stream: int) -> None:
        try:
            self._send(kind, stream, deadline=time.monotonic() + 1.0)
        except GuestError:
            pass

    def _next_frame(self, method: ch.Method, q: queue.Queue[tuple[int, bytes]], deadline: float | None,
                    timeout: float | None) -> tuple[int, bytes]:
        try:
            kind, payload = q.get(timeout=None if deadline is None else max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise AgentTimeout(f"guest agent {method.name} did not answer within {timeout}s") from None
        if kind == _CLOSED:
            raise GuestError(f"guest agent {method.name} failed: the control channel closed (QEMU exited)")
        if kind == ch.ERROR:
            raise _error(method.name, _parse(method.name, pb.Error, payload))
        return kind, payload

    def _unary(self, name: str, request: Any, timeout: float) -> Any:
        return self._call(name, (request,), timeout)

    def _call(self, name: str, requests: Iterable[Any], timeout: float) -> Any:
        """Send the request message(s) (and, for a client-streaming method, the end),
        then wait for the reply; the guest's error as soon as it comes (a failed
        write stops an upload)."""
        method = ch.METHODS[name]
        deadline = time.monotonic() + timeout
        stream, q = self._open(method)
        try:
            kind = ch.CALL
            for request in requests:
                if kind == ch.DATA and not q.empty():  # the guest answered early: an error
                    break
                self._send(kind, stream, request.SerializeToString(), method.id, deadline)
                kind = ch.DATA
            if method.client_streaming:
                self._send(ch.END, stream, deadline=deadline)
            _, payload = self._next_frame(method, q, deadline, timeout)
            return _parse(name, method.response, payload)
        except AgentTimeout:
            self._send_quietly(ch.CANCEL, stream)
            raise
        finally:
            self._forget(stream)

    def _server_stream(self, name: str, request: Any, timeout: float) -> Iterator[Any]:
        """The reply messages; closing the iterator early cancels the call."""
        method = ch.METHODS[name]
        deadline = time.monotonic() + timeout
        stream, q = self._open(method)
        ended = False
        try:
            self._send(ch.CALL, stream, request.SerializeToString(), method.id, deadline)
            while True:
                kind, payload = self._next_frame(method, q, deadline, timeout)
                if kind == ch.END:
                    ended = True
                    return
                yield _parse(name, method.response, payload)
        finally:
            self._forget(stream)
            if not ended:
                self._send_quietly(ch.CANCEL, stream)

    # --- the agent's methods -----------------------------------------------------------

    def health(self, timeout: float = 10.0) -> pb.HealthResponse:
        return self._unary("Health", pb.HealthRequest(), timeout)  # type: ignore[no-any-return]

    def describe(self, timeout: float = 10.0) -> pb.DescribeResponse:
        return self._unary("Describe", pb.DescribeRequest(), timeout)  # type: ignore[no-any-return]

    def read_mailbox(self, name: str, timeout: float = 10.0) -> pb.ReadMailboxResponse:
        return self._unary("ReadMailbox", pb.ReadMailboxRequest(name=name), timeout)  # type: ignore[no-any-return]

    def reconfigure_network(self, config: pb.NetworkConfig, timeout: float) -> pb.ReconfigureNetworkResponse:
        return self._unary("ReconfigureNetwork", config, timeout)  # type: ignore[no-any-return]

    def exec(
        self,
        argv: list[str],
        *,
        timeout: float,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> ExecResult:
        req = pb.ExecRequest(
            argv=argv, env=dict(env or {}), cwd=cwd or "", stdin=input or b"", timeout_s=timeout,
            output_limit=output_limit,
        )
        try:
            resp: pb.ExecResponse = self._unary("Exec", req, timeout + EXEC_GRACE_S)
        except AgentTimeout as exc:
            raise ExecTimeout(argv, timeout) from exc
        if resp.timed_out:
            raise ExecTimeout(argv, timeout, resp.stdout, resp.stderr)
        return ExecResult(tuple(argv), resp.exit_code, resp.stdout, resp.stderr, resp.duration_ms,
                          resp.stdout_dropped, resp.stderr_dropped, resp.spawn_ms)

    # Files: chunked streams (pytest_vmfork/vm/files.py builds and reads them).

    def put_file(self, requests: Iterable[pb.PutFileRequest], timeout: float) -> pb.PutResponse:
        return self._call("PutFile", requests, timeout)  # type: ignore[no-any-return]

    def get_file(self, path: str, timeout: float) -> Iterator[pb.FileChunk]:
        return self._server_stream("GetFile", pb.GetFileRequest(path=path), timeout)

    def put_tree(self, requests: Iterable[pb.PutTreeRequest], timeout: float) -> pb.PutResponse:
        return self._call("PutTree", requests, timeout)  # type: ignore[no-any-return]

    def get_tree(self, guest_dir: str, timeout: float) -> Iterator[pb.TreeEntry]:
        return self._server_stream("GetTree", pb.GetTreeRequest(guest_dir=guest_dir), timeout)

    # Background processes (pytest_vmfork/vm/process.py).

    def spawn(self, request: pb.SpawnRequest, timeout: float = 30.0) -> pb.SpawnResponse:
        return self._unary("Spawn", request, timeout)  # type: ignore[no-any-return]

    def read_process(self, request: pb.ReadProcessRequest, timeout: float) -> pb.ProcessState:
        return self._unary("ReadProcess", request, timeout)  # type: ignore[no-any-return]

    def signal_process(self, pid: int, sig: int, *, group: bool, timeout: float = 10.0) -> bool:
        req = pb.SignalProcessRequest(pid=pid, signal=sig, group=group)
        return bool(self._unary("SignalProcess", req, timeout).delivered)

    def shell(self, inputs: Iterator[pb.ShellInput]) -> Iterator[pb.ShellOutput]:
        """The Shell stream: no deadline (a person is typing); it ends with the
        program's exit (the last message). Inputs are sent from a thread."""
        method = ch.METHODS["Shell"]
        stream, q = self._open(method)
        first = next(inputs)
        self._send(ch.CALL, stream, first.SerializeToString(), method.id)

        def pump() -> None:
            try:
                for item in inputs:
                    self._send(ch.DATA, stream, item.SerializeToString())
                self._send(ch.END, stream)
            except GuestError:
                pass

        threading.Thread(target=pump, name="vmfork-shell-input", daemon=True).start()
        try:
            while True:
                kind, payload = self._next_frame(method, q, None, None)
                out = _parse("Shell", pb.ShellOutput, payload)
                yield out
                if kind == ch.END:
                    return
        finally:
            self._forget(stream)

    def close(self) -> None:
        """Close the channel (the VM is going away); pending calls fail. Idempotent."""
        self.closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _parse(method: str, cls: Any, payload: bytes) -> Any:
    try:
        return cls.FromString(payload)
    except DecodeError as exc:
        raise GuestError(f"guest agent {method}: the guest sent a malformed {cls.__name__}: {exc}") from exc


def _error(method: str, err: pb.Error) -> Exception:
    """The host-side error for a call the guest failed: GuestFileError when it named
    an errno (file and process calls), else GuestError."""
    name, detail = err.errno, err.message[:4096]
    if name:
        number = getattr(errno, name, None) if name.startswith("E") and name.isalnum() else None
        return GuestFileError(f"guest path {detail}", guest_path=err.path[:4096], errno=number)
    return GuestError(f"guest agent {method} failed: {err.code[:64]}: {detail}")
