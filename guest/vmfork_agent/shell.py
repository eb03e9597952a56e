"""The interactive shell (``vmfork shell``): a program on a PTY, streamed both ways.

Apart from programs.py because a terminal is another kind of program: ``pty.fork``
instead of ``posix_spawn``, one master descriptor read and written by the loop,
window sizes, and a hangup when the host's side goes away.
"""

from __future__ import annotations

import fcntl
import os
import pty
import selectors
import signal
import struct
import termios

from vmfork_agent.calls import Call
from vmfork_agent.programs import CHILD_ENV

from pytest_vmfork import channel as ch
from pytest_vmfork.proto import agent_pb2 as pb

SHELL_CHUNK = 65536  # bytes per PTY read or write


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

