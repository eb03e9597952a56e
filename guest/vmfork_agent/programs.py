"""Programs: how the agent starts one, watches its pipes and exit, and the Exec call.

A program starts with ``posix_spawn`` in its own session (a timeout kills its whole
group); the loop reads its pipes and learns its exit from a pidfd, never a thread.
Exec (run to completion, bounded output) is here; a background program's record and
its long polls are processes.py, built on the same :class:`Program`.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import signal
import subprocess
import time
from typing import TYPE_CHECKING

from vmfork_agent.calls import Call, invalid

from pytest_vmfork.proto import agent_pb2 as pb

if TYPE_CHECKING:
    from vmfork_agent.server import Agent

F_SETPIPE_SZ = 1031
CHILD_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
EXEC_OUTPUT_LIMIT = 8 << 20  # default bytes kept of an exec's stdout and of its stderr
KILL_GRACE_S = 5.0  # after an exec's timeout kill, its pipes get this long to close
WRITE_CHUNK = 65536  # bytes per write to a program's stdin
READ_SIZE = 1 << 16
SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores these; a program gets the defaults


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
                self.view = self.view[os.write(fd, self.view[:WRITE_CHUNK]):]
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

