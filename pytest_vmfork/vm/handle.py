"""The ``VM`` handle: what a test does with a running fork.

A thin public object over a :class:`pytest_vmfork.vm.restore.ForkEngine`, which
owns the QEMU, the network and the lifecycle. Every call that needs a running
guest asks the engine's lifecycle first, so a call in the wrong state is a
StateError naming the state (pytest_vmfork.vm.state).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.errors import ConfigError, GuestError
from pytest_vmfork.host.run import Run
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.vm import command, files
from pytest_vmfork.vm import process as proc
from pytest_vmfork.vm.agent import DEFAULT_OUTPUT_LIMIT, AgentClient, ExecResult
from pytest_vmfork.vm.layer import check_name
from pytest_vmfork.vm.payloads import prepare_mailboxes
from pytest_vmfork.vm.restore import DEFAULT_READY_TIMEOUT, ForkEngine, elapsed_ms
from pytest_vmfork.vm.snapshot import Snapshot, require_mailboxes
from pytest_vmfork.vm.state import VMState


class VM:
    """A running fork. Use as a context manager, or call :meth:`close`."""

    def __init__(self, engine: ForkEngine) -> None:
        self._engine = engine
        self._processes: list[proc.Process] = []
        #: merged into the manifest of every snapshot this VM saves (the plugin marks
        #: a test's snapshots ``ephemeral``: removed when the run ends)
        self.snapshot_manifest: dict[str, Any] = {}

    # --- what it is ------------------------------------------------------------

    @property
    def engine(self) -> ForkEngine:
        """The restore engine under this handle (its QEMU, for benchmarks and debugging)."""
        return self._engine

    @property
    def name(self) -> str:
        return self._engine.name

    @property
    def forked_from(self) -> Snapshot:
        return self._engine.snapshot

    @property
    def run(self) -> Run:
        return self._engine.run

    @property
    def dir(self) -> Path:
        """The fork's working directory (console.log, qemu.stderr, handles.json)."""
        return self._engine.dir

    @property
    def state(self) -> VMState:
        """Where it is in its life (a :class:`VMState`; equal to the plain strings too)."""
        return self._engine.state

    @property
    def generation(self) -> int:
        """This resume's generation: new on every resume (fork, deliver, snapshot)."""
        return self._engine.generation

    @property
    def timings(self) -> dict[str, Any]:
        """The fork's figures in ms (docs/performance.md)."""
        return self._engine.timings

    @timings.setter
    def timings(self, value: dict[str, Any]) -> None:
        self._engine.timings = value

    @property
    def ip(self) -> str | None:
        return self._engine.ip

    @property
    def mac(self) -> str | None:
        return self._engine.mac

    @property
    def token(self) -> str:
        """The secret the guest's acks carry (a UDP ack from anyone else is ignored)."""
        return self._engine.token

    @property
    def tap(self) -> str | None:
        """The host TAP device of a fork on a TAP network; None otherwise."""
        return self._engine.tap

    @property
    def pid(self) -> int | None:
        return self._engine.pid

    @property
    def agent(self) -> AgentClient:
        """The guest agent's client (the control channel), for calls this class has no
        method for (``vm.agent.health()``). StateError unless the VM is running."""
        return self._engine.running_agent("use the agent")

    # --- commands --------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 60.0,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> ExecResult:
        """Run a program in the guest and wait for it (a string runs under sh -c).

        stdout and stderr keep ``output_limit`` bytes each (default 8 MiB, at
        most 64 MiB): the guest drops the rest, ends the stream with a
        ``[vmfork: stdout truncated ...]`` line and reports the dropped count in
        ``stdout_dropped``/``stderr_dropped``, so a program that prints gigabytes
        costs the host no more than that."""
        agent = self._engine.running_agent("exec")
        argv = command.argv_of("exec", argv)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"exec timeout must be a positive number of seconds, got {timeout!r}")
        command.check_env_cwd("exec", env, cwd)
        command.check_output_limit("exec", output_limit)
        data = command.stdin_bytes("exec", "input", input)
        first = "first_exec_ms" not in self.timings
        try:
            t0 = time.monotonic()
            result = agent.exec(argv, timeout=timeout, input=data, env=env, cwd=cwd, output_limit=output_limit)
            if first:
                self._time_first_exec(t0, result)
            return result
        except GuestError as exc:
            failure = self._engine.failure(f"while running {argv}")
            if failure is None:
                raise
            raise failure from exc

    def _time_first_exec(self, t0: float, result: ExecResult) -> None:
        """``first_exec_ms`` and its stages: what a test waits for beyond the fork.

        ``rpc_ms``: the request's and reply's way through the control channel
        (host client, QEMU's virtio-serial, the guest agent's loop); ``spawn_ms``
        and ``run_ms``: the guest agent's own (start the program; run and reap it)."""
        total = elapsed_ms(t0)
        guest = max(result.duration_ms, 0.0)
        self.timings["first_exec_ms"] = total
        self.timings["first_exec"] = {
            "rpc_ms": round(max(total - guest, 0.0), 2),
            "spawn_ms": round(result.spawn_ms, 2),
            "run_ms": round(max(guest - result.spawn_ms, 0.0), 2),
        }

    def spawn(
        self,
        argv: Sequence[str] | str,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | str | None = None,
        output_limit: int = proc.DEFAULT_OUTPUT_LIMIT,
    ) -> proc.Process:
        """Start a program in the background (a string runs under sh -c); see
        pytest_vmfork/vm/process.py. It dies with the fork at teardown."""
        p = proc.spawn(self._engine.running_agent("spawn"), self.name, argv, env=env, cwd=cwd, stdin=stdin,
                       output_limit=output_limit)
        self._processes.append(p)
        return p

    def shell(self, inputs: Iterator[pb.ShellInput]) -> Iterator[pb.ShellOutput]:
        """An interactive program on a guest PTY (the agent's Shell stream; the first
        input names the program and the terminal). pytest_vmfork/cli/shell.py drives it."""
        return self._engine.running_agent("shell").shell(inputs)

    # --- files -----------------------------------------------------------------

    def put(self, guest_path: str, data: files.Data, *, mode: int | None = None,
            timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Write a guest file: ``data`` is its content (bytes or str) or a host file
        (a ``pathlib.Path``). Streamed in 1 MiB chunks; see pytest_vmfork/vm/files.py."""
        files.put(self._engine.running_agent("put"), guest_path, data, mode=mode, timeout=timeout)

    def get(self, guest_path: str, *, timeout: float = files.DEFAULT_TIMEOUT,
            max_bytes: int = files.MAX_GET_BYTES) -> bytes:
        """A guest file's content."""
        return files.get(self._engine.running_agent("get"), guest_path, timeout=timeout, max_bytes=max_bytes)

    def put_tree(self, host_dir: "str | os.PathLike[str]", guest_dir: str, *,
                 timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Copy the contents of a host directory into ``guest_dir`` (modes and symlinks kept)."""
        files.put_tree(self._engine.running_agent("put_tree"), host_dir, guest_dir, timeout=timeout)

    def get_tree(self, guest_dir: str, host_dir: "str | os.PathLike[str]", *,
                 timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Copy the contents of ``guest_dir`` into a host directory (modes and symlinks kept)."""
        files.get_tree(self._engine.running_agent("get_tree"), guest_dir, host_dir, timeout=timeout)

    # --- mailboxes ---------------------------------------------------------------

    def read_mailbox(self, name: str) -> Any:
        """The JSON payload the guest received in mailbox ``name`` (None if none)."""
        require_mailboxes(self.forked_from, [name])
        got = self._engine.running_agent("read_mailbox").read_mailbox(name)
        limit = mbx.capacity(mbx.DEFAULT_SIZE)
        if len(got.payload) > limit:  # the guest is untrusted: no mailbox holds more
            raise GuestError(f"VM {self.name}: the guest returned {len(got.payload)} bytes for mailbox {name!r}, "
                             f"more than a mailbox holds ({limit})")
        try:
            return json.loads(got.payload) if got.payload else None
        except ValueError as exc:
            raise GuestError(f"VM {self.name}: the guest returned a mailbox {name!r} payload that is not "
                             f"JSON: {exc}") from exc

    def deliver(self, mailboxes: Mapping[str, Any], *, timeout: float = DEFAULT_READY_TIMEOUT) -> None:
        """Deliver new payloads to this running fork: a second resume of the same memory.

        The vCPUs are stopped, the payloads written like at fork time, and the
        guest resumes and republishes them; returns once it signalled readiness.
        """
        self._engine.lifecycle.check("deliver", VMState.RUNNING)
        payloads, acks = prepare_mailboxes(self.forked_from, mailboxes)
        if acks:
            raise ConfigError("deliver() does not wait for acks; poll the guest instead")
        t0 = time.monotonic()
        self._engine.resume(payloads, ready_timeout=timeout, after="deliver()")
        self.timings["deliver_ms"] = elapsed_ms(t0)

    # --- snapshots ---------------------------------------------------------------

    def snapshot(self, name: str | None = None, *, resume: bool = True) -> Snapshot:
        """Save this running fork, memory and devices, as a new snapshot in the cache.

        The vCPUs stop for the save (``vm.timings["snapshot_ms"]``; its size on
        disk is ``snapshot_bytes``). The returned Snapshot forks like the
        template's (``fork()``, ``vm_factory(snapshot=...)``, the ``vm`` fixture):
        its forks share its memory copy-on-write and get their own mailbox
        payloads, network, entropy and clock. ``name`` labels it in the cache
        (``vmfork kept``, the manifest). With ``resume=False`` this VM stays
        paused (state "paused"); otherwise it runs on, with fresh entropy and
        clock like a new fork, so it and its snapshot's forks differ too.
        """
        self._engine.lifecycle.check("snapshot", VMState.RUNNING)
        check_name(name)
        if not isinstance(resume, bool):
            raise ConfigError(f"snapshot(resume={resume!r}): use True or False")
        return self.save(name=name, resume=resume)

    def save(self, *, name: str | None = None, resume: bool = True, key: str | None = None,
             extra: dict[str, Any] | None = None) -> Snapshot:
        """:meth:`snapshot` with the cache's details: ``key`` names the cache entry
        (replaced if it exists; default: a random one) and ``extra`` is merged into
        its manifest after :attr:`snapshot_manifest`. The plugin saves layers and
        kept failed VMs this way."""
        self._engine.lifecycle.check("save", VMState.RUNNING)
        return self._engine.save(name=name, resume=resume, key=key,
                                 extra={**self.snapshot_manifest, **(extra or {})})

    # --- the host side -----------------------------------------------------------

    def host_port(self, guest_port: int) -> int:
        """A 127.0.0.1 port forwarded to ``guest_port`` (user-mode network only;
        with a TAP network connect to ``vm.ip`` directly)."""
        return self._engine.host_port(guest_port)

    def console_tail(self, lines: int = 40) -> str:
        return self._engine.console_tail(lines)

    def alive(self) -> bool:
        return self._engine.alive()

    def report_sections(self) -> list[tuple[str, str]]:
        """(title, text) sections for a failure report: the console tail, then every
        spawned process that has exited, with its status and output tail."""
        tail = self.console_tail() or self.timings.get("console_tail", "")
        sections = [(f"vmfork console of {self.name} (last lines)", tail)]
        for p in self._processes:
            section = p.report_section()
            if section is not None:
                sections.append(section)
        return sections

    def close(self, *, keep_files: bool = False) -> None:
        """Kill the VMM and remove the fork's files (unless ``keep_files``, for
        debugging a failure). Idempotent; never raises."""
        if self.state is VMState.CLOSED:
            return
        for p in self._processes:
            p.forget()  # they die with QEMU: never an error
        self._engine.close(keep_files=keep_files)

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state} pid={self.pid}>"
