"""Forks: restore a VM from a snapshot in a fraction of a second.

The restore sequence (every step bounded; the guest signals readiness):

1. spawn QEMU paused, waiting for incoming state; it connects QMP and the
   event channel to sockets we already listen on (no polling for files);
2. ``announce-rounds=0`` (a fork must not broadcast the template's MAC/IP),
   ``x-ignore-shared`` (RAM comes from the privately mapped snapshot file),
   then load the ~1 MB device state;
3. patch the mailboxes (system: entropy, clock, generation; user payloads)
   into this QEMU's private copy of guest RAM through /proc/<pid>/mem;
4. queue the resume doorbell on the event channel and ``cont``;
5. wait for the agent's ``event=ready gen=<this fork's generation>`` line.

``restore_to_healthy_ms`` runs from the fork request to step 5.
"""

from __future__ import annotations

import mmap
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import mailbox as mbx
from .agent import AgentClient, ExecResult
from .errors import ConfigError, RestoreError, StateError
from .run import Run, write_handles
from .snapshot import Snapshot, require_mailboxes
from .vmm import ProcMem, QemuProcess

DEFAULT_READY_TIMEOUT = 30.0
FORK_MAC = "52:54:00:00:00:01"  # the device keeps the template's MAC until the guest changes it


def prepare_mailboxes(snapshot: Snapshot, payloads: Mapping[str, Any] | None) -> dict[str, bytes]:
    """Validate and encode user payloads before any VM is touched."""
    if not payloads:
        return {}
    if not isinstance(payloads, Mapping):
        raise ConfigError(f"mailboxes must be a dict of name -> JSON object, got {type(payloads).__name__}")
    if len(payloads) > mbx.MAX_MAILBOXES:
        raise ConfigError(
            f"{len(payloads)} mailboxes requested for one fork; at most {mbx.MAX_MAILBOXES} are allowed"
        )
    encoded = {}
    for name, payload in payloads.items():
        try:
            mbx.validate_name(name)
            encoded[name] = mbx.encode_payload(payload, name=name)
        except mbx.MailboxError as exc:
            raise ConfigError(str(exc)) from exc
    require_mailboxes(snapshot, list(encoded))
    return encoded


class VM:
    """A running fork. Use as a context manager, or call :meth:`close`."""

    def __init__(self, name: str, snapshot: Snapshot, run: Run, workdir: Path) -> None:
        self.name = name
        self.snapshot = snapshot
        self.run = run
        self.dir = workdir
        self.generation = 0
        self.timings: dict[str, Any] = {}
        self.state = "starting"
        self._qemu: QemuProcess | None = None
        self._agent: AgentClient | None = None

    # --- public API -----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._qemu.pid if self._qemu else None

    def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float = 60.0,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        """Run a program in the guest and wait for it (a string runs under sh -c)."""
        if self.state != "running":
            raise StateError("exec", self.state, "running")
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        argv = list(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"exec argv must be a non-empty list of strings, got {argv!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"exec timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(input, str):
            input = input.encode()
        assert self._agent is not None
        return self._agent.exec(argv, timeout=timeout, input=input, env=env, cwd=cwd)

    def read_mailbox(self, name: str) -> Any:
        """The JSON payload the guest received in mailbox ``name`` (None if none)."""
        import json

        require_mailboxes(self.snapshot, [name])
        assert self._agent is not None
        got = self._agent.read_mailbox(name)
        return json.loads(got.payload) if got.payload else None

    def console_tail(self, lines: int = 40) -> str:
        return self._qemu.console_tail(lines) if self._qemu else ""

    def alive(self) -> bool:
        return self._qemu is not None and self._qemu.alive()

    def close(self, *, keep_files: bool = False) -> None:
        """Kill the VMM and remove the fork's files (unless ``keep_files``, for
        debugging a failure). Idempotent; never raises."""
        if self.state == "closed":
            return
        self.state = "closed"
        if self._agent is not None:
            self._agent.close()
        if self._qemu is not None:
            self._qemu.kill()
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state} pid={self.pid}>"

    # --- restore --------------------------------------------------------------

    def _restore(self, user_payloads: dict[str, bytes], ready_timeout: float) -> None:
        t0 = time.monotonic()
        snap = self.snapshot
        argv = snap.machine.argv(
            workdir=self.dir,
            mem_path=snap.memory_path,
            shared=False,
            incoming=True,
            netdev=["type=hubport", "hubid=0"],
            mac=FORK_MAC,
            name=self.name,
        )
        qemu = self._qemu = QemuProcess.start(argv, self.dir, self.name)
        write_handles(
            self.dir,
            {"name": self.name, "pid": qemu.pid, "start_time": qemu.start_time, "run_id": self.run.run_id},
        )
        self.timings["spawn_ms"] = _ms(t0)
        qemu.cmd("migrate-set-parameters", **{"announce-rounds": 0})
        qemu.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True},
                          {"capability": "events", "state": True}],
        )
        qemu.cmd("migrate-incoming", uri=f"exec:cat {snap.state_path}")
        qemu.wait_migration(timeout=30)
        self.timings["load_ms"] = _ms(t0)

        t_patch = time.monotonic()
        self.generation = secrets.randbits(52) | 1
        system = mbx.encode_payload(
            {"gen": self.generation, "entropy": secrets.token_hex(32), "time_ns": time.time_ns()},
            name=mbx.SYSTEM_MAILBOX,
        )
        self._patch({mbx.SYSTEM_MAILBOX: system, **user_payloads})
        self.timings["patch_ms"] = _ms(t_patch)

        ready = qemu.expect_event(
            lambda f: f.get("event") in ("ready", "error") and f.get("gen") in (str(self.generation), None)
        )
        qemu.ring_doorbell()
        qemu.cmd("cont")
        self.timings["resume_ms"] = _ms(t0)
        try:
            fields = qemu.wait_event(ready, ready_timeout)
        except (TimeoutError, EOFError) as exc:
            why = "QEMU exited" if not qemu.alive() else f"no readiness signal within {ready_timeout}s"
            raise RestoreError(f"fork {self.name}: {why}", console_tail=qemu.console_tail()) from exc
        if fields.get("event") == "error":
            raise RestoreError(
                f"fork {self.name}: guest agent failed to resume: {fields}", console_tail=qemu.console_tail()
            )
        self.timings["guest_resume_ms"] = float(fields.get("resume_ms", "nan"))
        self.timings["restore_to_healthy_ms"] = _ms(t0)
        self._agent = AgentClient(qemu.ctl_path)
        self.state = "running"

    def _patch(self, payloads: dict[str, bytes]) -> None:
        """Write every payload, after checking every target (all or nothing)."""
        assert self._qemu is not None
        snap = self.snapshot
        mem = ProcMem(self._qemu.pid, snap.memory_path)
        plan: list[tuple[int, bytes]] = []
        path = "direct"
        for name, data in payloads.items():
            want = mbx.marker(name, snap.nonce, mbx.PAGE_SIZE)
            off = snap.offsets.get(name, -1)
            if off < 0 or mem.read(off, len(want)) != want:
                path = "scan"
                off = _scan(snap.memory_path, want)
                if off < 0:
                    raise RestoreError(
                        f"fork {self.name}: mailbox {name!r} not found in guest memory "
                        "(neither at its recorded offset nor by a scan); rebuild the snapshot "
                        "with --vmfork-rebuild"
                    )
            seq = mbx.sequence_of(mem.read(off, mbx.HEADER_SIZE)) + 1
            plan += [(off + o, d) for o, d in mbx.write_plan(data, seq)]
        mem.write(plan)
        self.timings["mailbox_path"] = path


def _scan(memory_path: Path, want: bytes) -> int:
    with open(memory_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return mbx.find(m, want)


def _ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)


def fork(
    snapshot: Snapshot,
    *,
    run: Run | None = None,
    mailboxes: Mapping[str, Any] | None = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
) -> VM:
    """Restore a new VM from ``snapshot`` and return it once the guest is ready.

    The returned VM must be closed (``with fork(snap) as vm: ...``). On any
    failure the half-started fork is torn down before the error propagates.
    """
    if not isinstance(ready_timeout, (int, float)) or not 0 < ready_timeout <= 600:
        raise ConfigError(f"ready_timeout={ready_timeout!r}: use seconds between 0 and 600")
    payloads = prepare_mailboxes(snapshot, mailboxes)
    run = run or Run()
    name, workdir = run.new_vm_dir("f")
    vm = VM(name, snapshot, run, workdir)
    try:
        vm._restore(payloads, ready_timeout)
    except BaseException:
        vm.state = "failed"
        console = vm.console_tail()
        vm.close()
        vm.state = "failed"
        vm.timings["console_tail"] = console
        raise
    return vm
