"""Background processes in a fork: ``vm.spawn(argv) -> Process``.

The guest agent starts the program in its own session (it leads a new process
group), keeps the newest ``output_limit`` bytes of its stdout and stderr, and
reaps it. The host asks for output past what it already has with a long poll
(``ReadProcess`` waits in the guest for new output or the exit, bounded), so
``wait()`` and ``lines()`` wake on the guest's signal, never on a sleep.

Output is bounded on both sides (the guest is untrusted): each stream keeps its
newest ``output_limit`` bytes; older bytes are dropped and ``stdout``/``stderr``
then start with :func:`truncation_marker`. A process still running when its
fork is torn down dies with it; that is never an error.
"""

from __future__ import annotations

import signal as _signal
import threading
import time
from typing import Iterator, Mapping, Sequence

from pytest_vmfork.errors import ConfigError, GuestError, GuestFileError, ProcessTimeout, StateError
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.vm import command
from pytest_vmfork.vm.agent import AgentClient

DEFAULT_OUTPUT_LIMIT = 1 << 20  # bytes kept per stream
DEFAULT_TIMEOUT = 60.0
POLL_S = 5.0  # one long poll; a wait is a series of these
RPC_GRACE_S = 10.0
REPORT_TAIL_LINES = 20
REPORT_TAIL_BYTES = 4096
#: How long a failure report waits for the guest's view of a process: a TCG guest on a
#: loaded CI host (two xdist workers) took over 3 s; a failing test can afford this.
REPORT_RPC_TIMEOUT_S = 10.0


def truncation_marker(stream: str, dropped: int) -> bytes:
    """What ``stdout``/``stderr`` (and ``lines()``) show where older output was dropped."""
    return f"[vmfork: {dropped} earlier bytes of {stream} dropped (output_limit)]\n".encode()


def describe_status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {-returncode} ({_signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class OutputBuffer:
    """The newest ``limit`` bytes of one stream and the absolute offsets they cover."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit = name, limit
        self.data = bytearray()
        self.end = 0  # absolute offset just past data
        self.dropped = 0

    @property
    def start(self) -> int:
        return self.end - len(self.data)

    def take(self, start: int, data: bytes) -> None:
        if start > self.end:  # the guest dropped these before we asked: what we hold is older still
            self.dropped += start - self.end + len(self.data)
            self.data.clear()
            self.end = start
        skip = self.end - start  # bytes we already have (a guest must not resend them)
        if skip < len(data):
            self.data += data[skip:]
            self.end += len(data) - skip
        if len(self.data) > self.limit:
            cut = len(self.data) - self.limit
            del self.data[:cut]
            self.dropped += cut

    def value(self) -> bytes:
        return (truncation_marker(self.name, self.dropped) if self.dropped else b"") + bytes(self.data)


class Process:
    """A program running in the background in a fork (see :meth:`VM.spawn`).

    ``returncode`` is None while it runs (as last seen); ``poll()`` asks the guest.
    ``stdout``/``stderr`` are the output so far (each access fetches what is new).
    """

    def __init__(self, agent: AgentClient, argv: Sequence[str], pid: int, output_limit: int, vm_name: str) -> None:
        self._agent = agent
        self.argv = tuple(argv)
        self.pid = pid
        self.vm_name = vm_name
        self.output_limit = output_limit
        self.returncode: int | None = None
        self._out = OutputBuffer("stdout", output_limit)
        self._err = OutputBuffer("stderr", output_limit)
        self._lock = threading.Lock()
        self._drained = False  # exited and every byte it printed has been received
        self._closed = False  # its fork is gone

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} {list(self.argv)!r} {describe_status(self.returncode)}>"

    # --- talking to the guest ----------------------------------------------------

    def _refresh(self, wait_s: float = 0.0, rpc_timeout: float | None = None) -> None:
        """One ReadProcess round trip: new output and the exit status."""
        if self._closed or self._drained:
            return
        with self._lock:
            req = pb.ReadProcessRequest(
                pid=self.pid, stdout_offset=self._out.end, stderr_offset=self._err.end,
                wait_s=wait_s, max_bytes=min(self.output_limit, 1 << 20),
            )
            state = self._agent.read_process(req, rpc_timeout or wait_s + RPC_GRACE_S)
            limit = req.max_bytes
            self._out.take(state.stdout_start, state.stdout[:limit])
            self._err.take(state.stderr_start, state.stderr[:limit])
            if state.exited:
                self.returncode = state.returncode
                complete = state.stdout_total <= self._out.end and state.stderr_total <= self._err.end
                self._drained = complete

    def forget(self) -> None:
        """Its fork closed (``vm.close()`` calls this): the process died with it, and
        every later call answers from what was received or raises StateError."""
        self._closed = True

    def _require_running_vm(self, op: str) -> None:
        if self._closed:
            raise StateError(f"{op} process {self.pid}", "closed", "running (the process died with its fork)",
                             vm=self.vm_name)

    # --- public API -------------------------------------------------------------

    def poll(self) -> int | None:
        """The exit status if it has exited (negative: killed by that signal), else None."""
        self._refresh()
        return self.returncode

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until it exits and return its status; ProcessTimeout after ``timeout``
        seconds (the process keeps running)."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"wait timeout={timeout!r} must be a positive number of seconds")
        if self.returncode is not None and (self._drained or self._closed):
            return self.returncode
        self._require_running_vm("wait for")
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None and self._drained:
                return self.returncode
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._refresh(min(left, POLL_S))
            if self.returncode is not None:
                while not self._drained and time.monotonic() < deadline:
                    self._refresh()  # output past one answer's max_bytes
                return self.returncode
        raise ProcessTimeout(f"process {self.pid} {list(self.argv)} did not exit within {timeout}s"
                             f"{self._tail_text()}")

    def signal(self, sig: int) -> bool:
        """Send ``sig`` to the process; False if it had already exited."""
        if not isinstance(sig, int) or isinstance(sig, bool):
            raise ConfigError(f"signal {sig!r}: use a signal number such as signal.SIGTERM")
        self._require_running_vm("signal")
        return self._agent.signal_process(self.pid, int(sig), group=False)

    def kill(self) -> bool:
        """SIGKILL its whole process group (children of a shell too); False if it had exited."""
        self._require_running_vm("kill")
        return self._agent.signal_process(self.pid, int(_signal.SIGKILL), group=True)

    @property
    def stdout(self) -> bytes:
        """Its stdout so far (the newest ``output_limit`` bytes, after a marker if some were dropped)."""
        self._refresh()
        return self._out.value()

    @property
    def stderr(self) -> bytes:
        """Its stderr so far, bounded like :attr:`stdout`."""
        self._refresh()
        return self._err.value()

    def lines(self, stream: str = "stdout", *, timeout: float = DEFAULT_TIMEOUT) -> Iterator[bytes]:
        """Yield its output line by line as it comes (bytes, newline included), from the
        start of the stream, until it exits. Stop early with ``break``. ProcessTimeout
        if no end within ``timeout`` seconds of the call. A line longer than
        ``output_limit`` comes in pieces; dropped output shows as the truncation marker."""
        if stream not in ("stdout", "stderr"):
            raise ConfigError(f"lines(stream={stream!r}): use 'stdout' or 'stderr'")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"lines timeout={timeout!r} must be a positive number of seconds")
        buf = self._out if stream == "stdout" else self._err
        deadline = time.monotonic() + timeout
        pos = 0  # absolute offset of the next byte to yield
        while True:
            if pos < buf.start:
                yield truncation_marker(stream, buf.start - pos)
                pos = buf.start
            at = pos - buf.start
            nl = buf.data.find(b"\n", at)
            if nl >= 0:
                line = bytes(buf.data[at : nl + 1])
                pos += len(line)
                yield line
                continue
            if len(buf.data) - at >= buf.limit:  # a line longer than the buffer: hand out what there is
                line = bytes(buf.data[at:])
                pos += len(line)
                yield line
                continue
            if self._drained or self._closed:
                if at < len(buf.data):
                    yield bytes(buf.data[at:])
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessTimeout(
                    f"process {self.pid} {list(self.argv)} did not end its {stream} within {timeout}s")
            self._refresh(min(left, POLL_S))

    # --- failure reports -----------------------------------------------------

    def _tail_text(self) -> str:
        parts = []
        for out in (self._out, self._err):
            if out.data or out.dropped:
                text = bytes(out.data[-REPORT_TAIL_BYTES:]).decode("utf-8", "replace")
                tail = "\n".join(text.splitlines()[-REPORT_TAIL_LINES:])
                parts.append(f"\n--- {out.name} (last lines) ---\n{tail}")
        return "".join(parts)

    def report_section(self) -> tuple[str, str] | None:
        """(title, text) for a failure report if the process has exited, else None.
        Asks the guest first (at most REPORT_RPC_TIMEOUT_S); never raises."""
        try:
            if not self._closed:
                self._refresh(rpc_timeout=REPORT_RPC_TIMEOUT_S)
        except (GuestError, TimeoutError):
            pass
        if self.returncode is None:
            return None
        title = f"vmfork process {self.pid} in {self.vm_name}: {list(self.argv)} {describe_status(self.returncode)}"
        return title, self._tail_text().lstrip("\n") or "(no output)"


def spawn(
    agent: AgentClient,
    vm_name: str,
    argv: Sequence[str] | str,
    *,
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | str | None,
    output_limit: int,
) -> Process:
    """Validate, start the program in the guest, return its handle."""
    argv = command.argv_of("spawn", argv)
    command.check_env_cwd("spawn", env, cwd)
    stdin = command.stdin_bytes("spawn", "stdin", stdin)
    command.check_output_limit("spawn", output_limit)
    req = pb.SpawnRequest(argv=argv, env=dict(env or {}), cwd=cwd or "", stdin=bytes(stdin or b""),
                          has_stdin=stdin is not None, output_limit=output_limit)
    try:
        pid = agent.spawn(req).pid
    except GuestFileError as exc:  # the guest's errno: a missing program, a bad cwd, ...
        raise GuestFileError(f"spawn {argv}: cannot start it: {exc}", guest_path=exc.guest_path,
                             errno=exc.errno) from exc
    return Process(agent, argv, pid, output_limit, vm_name)
