"""Host-side client of the guest agent's gRPC API (guest/agent.py).

The channel runs over the fork's ``org.vmfork.ctl`` virtio-serial port, which
QEMU exposes as a Unix socket: it needs no guest address and survives every
network change, which is what makes it the fallback path for the handoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import grpc

from .errors import GuestError
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc as pb_grpc

#: Extra seconds the host waits beyond an exec's own guest-side timeout.
EXEC_GRACE_S = 10.0


@dataclass(frozen=True)
class ExecResult:
    """What a program run in the guest returned."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes
    duration_ms: float

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
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                ("grpc.max_send_message_length", 256 * 1024 * 1024),
                ("grpc.initial_reconnect_backoff_ms", 20),
                ("grpc.min_reconnect_backoff_ms", 20),
            ],
        )
        self._stub = pb_grpc.AgentStub(self._channel)

    def _call(self, method: str, request: object, timeout: float) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError(f"guest agent {method} did not answer within {timeout}s") from exc
            raise GuestError(f"guest agent {method} failed: {code}: {detail}") from exc

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
    ) -> ExecResult:
        req = pb.ExecRequest(
            argv=argv, env=dict(env or {}), cwd=cwd or "", stdin=input or b"", timeout_s=timeout
        )
        try:
            resp: pb.ExecResponse = self._call("Exec", req, timeout + EXEC_GRACE_S)  # type: ignore[assignment]
        except TimeoutError as exc:
            raise ExecTimeout(argv, timeout) from exc
        if resp.timed_out:
            raise ExecTimeout(argv, timeout, resp.stdout, resp.stderr)
        return ExecResult(tuple(argv), resp.exit_code, resp.stdout, resp.stderr, resp.duration_ms)

    def shell(self, inputs: Iterator[pb.ShellInput]) -> Iterator[pb.ShellOutput]:
        """The Shell stream: no deadline (a person is typing); it ends when the program exits."""
        try:
            yield from self._stub.Shell(inputs, wait_for_ready=True)
        except grpc.RpcError as exc:
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise GuestError(f"guest agent Shell failed: {detail}") from exc

    def close(self) -> None:
        self._channel.close()
