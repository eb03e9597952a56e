"""Host-side client of the guest agent's gRPC API (guest/agent.py).

The channel runs over the fork's ``org.vmfork.ctl`` virtio-serial port, which
QEMU exposes as a Unix socket: it needs no guest address and survives every
network change, which is what makes it the fallback path for the handoff.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import grpc

from .errors import GuestError, GuestFileError
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc as pb_grpc

#: Extra seconds the host waits beyond an exec's own guest-side timeout.
EXEC_GRACE_S = 10.0
#: Bytes of stdout and of stderr (each) an exec keeps by default; the guest
#: agent reads and drops the rest and ends the stream with a truncation marker.
DEFAULT_OUTPUT_LIMIT = 8 * 1024 * 1024
#: The largest ``output_limit`` an exec may ask for.
MAX_OUTPUT_LIMIT = 64 * 1024 * 1024
#: Room for the truncation markers and the message framing.
_SLACK = 64 * 1024
#: The largest gRPC message the host accepts from a guest: two full streams.
MAX_RECEIVE = 2 * MAX_OUTPUT_LIMIT + _SLACK
#: The largest request (exec stdin): the guest agent's gRPC server accepts 4 MiB.
MAX_SEND = 4 * 1024 * 1024


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

    def check(self) -> "ExecResult":
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
    """A gRPC channel to one VM's guest agent."""

    def __init__(self, ctl_socket: Path) -> None:
        self._channel = grpc.insecure_channel(
            f"unix:{ctl_socket}",
            options=[
                ("grpc.max_receive_message_length", MAX_RECEIVE),
                ("grpc.max_send_message_length", MAX_SEND),
                ("grpc.initial_reconnect_backoff_ms", 20),
                ("grpc.min_reconnect_backoff_ms", 20),
            ],
        )
        self._stub = pb_grpc.AgentStub(self._channel)

    def _call(self, method: str, request: object, timeout: float) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            raise _error(method, exc, timeout) from exc

    def _stream(self, method: str, request: object, timeout: float) -> Iterator[object]:
        """A server-streaming call; closing the iterator early cancels the RPC."""
        call = getattr(self._stub, method)(request, timeout=timeout, wait_for_ready=True)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise _error(method, exc, timeout) from exc
        finally:
            call.cancel()

    def health(self, timeout: float = 10.0) -> pb.HealthResponse:
        return self._call("Health", pb.HealthRequest(), timeout)  # type: ignore[return-value]

    def describe(self, timeout: float = 10.0) -> pb.DescribeResponse:
        return self._call("Describe", pb.DescribeRequest(), timeout)  # type: ignore[return-value]

    def read_mailbox(self, name: str, timeout: float = 10.0) -> pb.ReadMailboxResponse:
        return self._call("ReadMailbox", pb.ReadMailboxRequest(name=name), timeout)  # type: ignore[return-value]

    def reconfigure_network(self, config: pb.NetworkConfig, timeout: float) -> pb.ReconfigureNetworkResponse:
        return self._call("ReconfigureNetwork", config, timeout)  # type: ignore[return-value]

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
            resp: pb.ExecResponse = self._call("Exec", req, timeout + EXEC_GRACE_S)  # type: ignore[assignment]
        except TimeoutError as exc:
            raise ExecTimeout(argv, timeout) from exc
        if resp.timed_out:
            raise ExecTimeout(argv, timeout, resp.stdout, resp.stderr)
        return ExecResult(tuple(argv), resp.exit_code, resp.stdout, resp.stderr, resp.duration_ms,
                          resp.stdout_dropped, resp.stderr_dropped, resp.spawn_ms)

    # Files: chunked streams (pytest_vmfork/files.py builds and reads them).

    def put_file(self, requests: Iterable[pb.PutFileRequest], timeout: float) -> pb.PutResponse:
        return self._call("PutFile", iter(requests), timeout)  # type: ignore[return-value]

    def get_file(self, path: str, timeout: float) -> Iterator[pb.FileChunk]:
        return self._stream("GetFile", pb.GetFileRequest(path=path), timeout)  # type: ignore[return-value]

    def put_tree(self, requests: Iterable[pb.PutTreeRequest], timeout: float) -> pb.PutResponse:
        return self._call("PutTree", iter(requests), timeout)  # type: ignore[return-value]

    def get_tree(self, guest_dir: str, timeout: float) -> Iterator[pb.TreeEntry]:
        return self._stream("GetTree", pb.GetTreeRequest(guest_dir=guest_dir), timeout)  # type: ignore[return-value]

    # Background processes (pytest_vmfork/process.py).

    def spawn(self, request: pb.SpawnRequest, timeout: float = 30.0) -> pb.SpawnResponse:
        return self._call("Spawn", request, timeout)  # type: ignore[return-value]

    def read_process(self, request: pb.ReadProcessRequest, timeout: float) -> pb.ProcessState:
        return self._call("ReadProcess", request, timeout)  # type: ignore[return-value]

    def signal_process(self, pid: int, sig: int, *, group: bool, timeout: float = 10.0) -> bool:
        req = pb.SignalProcessRequest(pid=pid, signal=sig, group=group)
        return self._call("SignalProcess", req, timeout).delivered  # type: ignore[attr-defined]

    def shell(self, inputs: Iterator[pb.ShellInput]) -> Iterator[pb.ShellOutput]:
        """The Shell stream: no deadline (a person is typing); it ends when the program exits."""
        try:
            yield from self._stub.Shell(inputs, wait_for_ready=True)
        except grpc.RpcError as exc:
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise GuestError(f"guest agent Shell failed: {detail}") from exc

    def close(self) -> None:
        self._channel.close()


def _error(method: str, exc: grpc.RpcError, timeout: float) -> Exception:
    """The host-side error for a failed RPC: GuestFileError when the guest named an
    errno and a path (file and process RPCs), TimeoutError past the deadline."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"guest agent {method} did not answer within {timeout}s")
    meta = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
    name = meta.get("vmfork-errno")
    if isinstance(name, str):
        number = getattr(errno, name, None) if name.startswith("E") and name.isalnum() else None
        path = str(meta.get("vmfork-path", ""))[:4096]
        return GuestFileError(f"guest path {detail[:4096]}", guest_path=path, errno=number)
    return GuestError(f"guest agent {method} failed: {code}: {detail}")
