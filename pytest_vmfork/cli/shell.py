"""An interactive shell in a VM: a pseudo-terminal in the guest, over the control channel.

The guest agent's ``Shell`` RPC (a bidirectional stream) runs the shell on a
PTY; this side puts the local terminal into raw mode and forwards every byte,
so line editing is the guest shell's own (readline), Ctrl-C reaches the guest's
foreground program through the guest PTY's line discipline (not this process),
and a window size change (SIGWINCH) is sent on as a resize. It needs no guest
network: the control channel is a virtio-serial port.
"""

from __future__ import annotations

import os
import queue
import signal
import struct
import termios
import threading
import tty
from collections.abc import Iterator
from typing import TYPE_CHECKING, Sequence

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.proto import agent_pb2 as pb

if TYPE_CHECKING:
    from pytest_vmfork.vm.handle import VM

READ_CHUNK = 4096


def window_size(fd: int) -> tuple[int, int]:
    """(rows, cols) of the terminal on ``fd``; 24x80 when it is not one."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return size.lines, size.columns


def interactive(vm: "VM", argv: Sequence[str] | None = None, *, stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """Run ``argv`` (default: the guest's login shell) on a guest PTY attached to
    this terminal until it exits; returns its exit status."""
    if argv is not None and (not argv or not all(isinstance(a, str) for a in argv)):
        raise ConfigError(f"shell argv must be a non-empty list of strings, got {argv!r}")
    inputs: queue.Queue[pb.ShellInput | None] = queue.Queue()
    rows, cols = window_size(stdout_fd)
    inputs.put(pb.ShellInput(argv=list(argv or ()), rows=rows, cols=cols, term=os.environ.get("TERM", "xterm")))

    def requests() -> Iterator[pb.ShellInput]:
        while (item := inputs.get()) is not None:
            yield item

    def keyboard() -> None:
        while True:
            try:
                data = os.read(stdin_fd, READ_CHUNK)
            except OSError:
                return
            if not data:  # our stdin closed: end the guest's input too (Ctrl-D)
                inputs.put(pb.ShellInput(data=b"\x04"))
                return
            inputs.put(pb.ShellInput(data=data))

    def resized(signum: int, frame: object) -> None:
        r, c = window_size(stdout_fd)
        inputs.put(pb.ShellInput(rows=r, cols=c))

    saved = termios.tcgetattr(stdin_fd) if os.isatty(stdin_fd) else None
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGWINCH, resized) if on_main else None
    code = 255
    try:
        outputs = vm.shell(requests())  # StateError unless running; sends the first input now
        if saved is not None:
            tty.setraw(stdin_fd)
        threading.Thread(target=keyboard, name=f"vmfork-shell-{vm.name}", daemon=True).start()
        for out in outputs:
            if out.data:
                os.write(stdout_fd, out.data)
            if out.exited:
                code = out.exit_code
                break
    finally:
        inputs.put(None)
        if saved is not None:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        if on_main:
            signal.signal(signal.SIGWINCH, previous)
    return code


def set_window_size(fd: int, rows: int, cols: int) -> None:
    """TIOCSWINSZ on a terminal fd (tests size the PTY they drive the shell through)."""
    import fcntl

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
