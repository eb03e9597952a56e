"""A call: one stream of the control channel, and the errors a call sends back.

Every method of agent.proto runs as a :class:`Call` (or a subclass that takes the
client-streamed messages); a failure is a :class:`CallError` carrying the ``Error``
message (code, message, errno name, guest path) that the host maps to its own
exceptions. Apart from the loop (server.py) so each capability's module depends on
this small base only, never on the server.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from pytest_vmfork import channel as ch
from pytest_vmfork.proto import agent_pb2 as pb

if TYPE_CHECKING:
    from vmfork_agent.server import Agent

CHUNK = ch.CHUNK  # file content per message

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
    """A request the agent refuses as it stands (INVALID_ARGUMENT)."""
    return CallError("INVALID_ARGUMENT", message)


def absolute(path: str) -> str:
    """A request's guest path, normalised; INVALID_ARGUMENT unless it is absolute."""
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

