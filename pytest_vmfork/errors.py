"""The error tree. Everything pytest-vmfork raises derives from VMForkError.

    VMForkError
    ├── ConfigError      bad input; raised before any VM is touched (also a ValueError)
    ├── BuildError       image build, template boot, warm-up or snapshot failed
    │   └── ImageBuildError
    ├── RestoreError     a fork did not come up (carries the console tail)
    │   ├── HandoffError the network handoff failed on both paths
    │   ├── AckTimeout   a mailbox ack did not arrive in time
    │   ├── QemuTimeout  QEMU's monitor, a migration or a guest event did not answer
    │   │                in time (also a TimeoutError)
    │   └── EventChannelError the guest's event channel closed: the guest broke its
    │                    bounds (its QEMU was killed) or QEMU exited (also an EOFError)
    ├── GuestError       the guest agent failed or an exec timed out
    │   ├── GuestFileError   a guest file operation failed (errno + guest path)
    │   ├── ProcessTimeout   a spawned process did not exit in time
    │   └── AgentTimeout     a guest agent call got no answer in time (also a TimeoutError)
    └── StateError       an operation in the wrong lifecycle state
"""

from __future__ import annotations


class VMForkError(Exception):
    """Root of every pytest-vmfork error."""


class ConfigError(VMForkError, ValueError):
    """Invalid option, template or payload; nothing was started."""


class BuildError(VMForkError):
    """Building the image, booting the template or taking the snapshot failed."""

    def __init__(self, message: str, *, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- template console (last lines) ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class ImageBuildError(BuildError):
    """The guest image could not be built from Debian packages and wheels."""


class RestoreError(VMForkError):
    """A fork could not be restored to a healthy guest."""

    def __init__(self, message: str, *, console_tail: str = "") -> None:
        if console_tail:
            message = f"{message}\n--- fork console (last lines) ---\n{console_tail}"
        super().__init__(message)
        self.console_tail = console_tail


class HandoffError(RestoreError):
    """Neither the guest-initiated handoff nor the control channel fallback configured the network."""


class AckTimeout(RestoreError):
    """A mailbox requested with wait_for_ack was not acknowledged in time."""


class QemuTimeout(RestoreError, TimeoutError):
    """QEMU (its QMP monitor, a migration) or its guest (an event such as readiness)
    did not answer within the limit. Also a TimeoutError: callers that wait on a
    bound catch it as one."""


class EventChannelError(RestoreError, EOFError):
    """The guest's event channel closed: the guest broke its bounds (overlong line,
    flood; its QEMU was killed) or QEMU exited. Also an EOFError (the channel's end)."""


class GuestError(VMForkError):
    """The guest agent could not run a request (including exec timeouts)."""


class GuestFileError(GuestError):
    """A file operation in the guest failed. ``errno`` is the guest's errno
    (``errno.ENOENT``, ``errno.ENOSPC``, ...), ``guest_path`` the path it names."""

    def __init__(self, message: str, *, guest_path: str, errno: int | None) -> None:
        super().__init__(message)
        self.guest_path = guest_path
        self.errno = errno


class ProcessTimeout(GuestError):
    """A spawned process did not exit (or print a line) within the timeout; it keeps running."""


class AgentTimeout(GuestError, TimeoutError):
    """A call to the guest agent got no answer (or the guest took no request bytes)
    within its timeout; the call was cancelled. Also a TimeoutError."""


class StateError(VMForkError):
    """The VM is not in a state that allows this operation (pytest_vmfork.vm.state).

    The message names the state it was in and the one(s) the operation needs:
    ``cannot exec: VM 'f-1' is closed; exec needs running``."""

    def __init__(self, operation: str, state: str, required: str | tuple[str, ...], *, vm: str | None = None) -> None:
        need = required if isinstance(required, str) else " or ".join(required)
        who = f"VM {vm!r}" if vm else "VM"
        super().__init__(f"cannot {operation}: {who} is {state}; {operation} needs {need}")
        self.operation = operation
        self.state = state
        self.required = required
        self.vm = vm
