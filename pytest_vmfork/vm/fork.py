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

import contextlib
import math
import mmap
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence, Union

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.errors import AckTimeout, ConfigError, GuestError, HandoffError, RestoreError, StateError
from pytest_vmfork.host.confine import Handoff
from pytest_vmfork.host.run import Run, write_handles
from pytest_vmfork.net.forkleases import ForkLease
from pytest_vmfork.net.network import USER_NET, AckListener, RunNetwork, open_tap, tap_netdev, user_netdev
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.vm import files
from pytest_vmfork.vm import process as proc
from pytest_vmfork.vm.agent import DEFAULT_OUTPUT_LIMIT, MAX_OUTPUT_LIMIT, MAX_SEND, AgentClient, ExecResult
from pytest_vmfork.vm.layer import check_name, save_running
from pytest_vmfork.vm.procmem import ProcMem
from pytest_vmfork.vm.snapshot import Snapshot, require_mailboxes
from pytest_vmfork.vm.vmm import FORK_FILE_LIMIT, QemuProcess

DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_HANDOFF_TIMEOUT = 2.0  # the guest acks before it says ready: this only bounds a lost ack
FALLBACK_TIMEOUT = 10.0
MAX_ACK_TIMEOUT = 60.0
FORK_MAC = "52:54:00:00:00:01"  # the device keeps the template's MAC until the guest changes it
USER_GUEST_IP, USER_GATEWAY = "10.0.2.15", "10.0.2.2"  # QEMU user-mode defaults (USER_NET)
MAX_STDIN = MAX_SEND - 64 * 1024  # argv, env and framing share the request

#: ``network=`` for :func:`fork`: "none", "user" (QEMU user-mode, no privileges)
#: or a RunNetwork that is up (a TAP on the run's bridge).
Network = Union[str, RunNetwork, None]


class Pool(Protocol):
    """Where :func:`fork` takes a VM prepared ahead of the request (pytest_vmfork.vm.pool.WarmPool)."""

    def take(self, snapshot: Snapshot, network: Network) -> "VM | None": ...


@dataclass(frozen=True)
class MailboxPayload:
    """A payload plus delivery options, for ``fork(mailboxes={name: MailboxPayload(...)})``.

    With ``wait_for_ack`` the fork is ready only once the guest acknowledged the
    payload over UDP (by default the agent acks on delivery; a template can
    leave that to a guest program, see Template.guest_acked_mailboxes).
    """

    payload: Any
    wait_for_ack: bool = False
    ack_timeout: float = 2.0


def prepare_mailboxes(
    snapshot: Snapshot, payloads: Mapping[str, Any] | None
) -> tuple[dict[str, bytes], dict[str, float]]:
    """Validate and encode user payloads before any VM is touched.

    Returns the encoded payloads and, for those that wait for an ack, the timeout.
    """
    if not payloads:
        return {}, {}
    if not isinstance(payloads, Mapping):
        raise ConfigError(f"mailboxes must be a dict of name -> JSON object, got {type(payloads).__name__}")
    if len(payloads) > mbx.MAX_MAILBOXES:
        raise ConfigError(
            f"{len(payloads)} mailboxes requested for one fork; at most {mbx.MAX_MAILBOXES} are allowed"
        )
    encoded, acks = {}, {}
    for name, value in payloads.items():
        item = value if isinstance(value, MailboxPayload) else MailboxPayload(value)
        try:
            mbx.validate_name(name)
            encoded[name] = mbx.encode_payload(item.payload, name=name)
        except mbx.MailboxError as exc:
            raise ConfigError(str(exc)) from exc
        if not isinstance(item.wait_for_ack, bool):
            raise ConfigError(f"mailbox {name!r}: wait_for_ack must be True or False")
        timeout = item.ack_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_ACK_TIMEOUT:
            raise ConfigError(
                f"mailbox {name!r}: ack_timeout={timeout!r} must be a number of seconds from 0 to {MAX_ACK_TIMEOUT:g}"
            )
        if item.wait_for_ack:
            acks[name] = float(timeout)
    require_mailboxes(snapshot, list(encoded))
    return encoded, acks


class VM:
    """A running fork. Use as a context manager, or call :meth:`close`."""

    def __init__(self, name: str, snapshot: Snapshot, run: Run, workdir: Path) -> None:
        self.name = name
        self.forked_from = snapshot
        self.run = run
        self.dir = workdir
        self.generation = 0
        self.timings: dict[str, Any] = {}
        self.state = "starting"
        self.ip: str | None = None
        self.mac: str | None = None
        self.token = secrets.token_hex(8)
        self._qemu: QemuProcess | None = None
        self._agent: AgentClient | None = None
        self._network: Network = None
        self._net: dict[str, Any] | None = None
        self._lease: ForkLease | None = None
        self._acks: AckListener | None = None
        self._forwards: dict[int, int] = {}
        self._own_run = False
        self._processes: list[proc.Process] = []
        #: merged into the manifest of every snapshot this VM saves (the plugin marks
        #: a test's snapshots ``ephemeral``: removed when the run ends)
        self.snapshot_manifest: dict[str, Any] = {}

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
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> ExecResult:
        """Run a program in the guest and wait for it (a string runs under sh -c).

        stdout and stderr keep ``output_limit`` bytes each (default 8 MiB, at
        most 64 MiB): the guest drops the rest, ends the stream with a
        ``[vmfork: stdout truncated ...]`` line and reports the dropped count in
        ``stdout_dropped``/``stderr_dropped``, so a program that prints gigabytes
        costs the host no more than that."""
        if self.state != "running":
            raise StateError("exec", self.state, "running")
        if isinstance(argv, str):
            argv = ["/bin/sh", "-c", argv]
        argv = list(argv)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"exec argv must be a non-empty list of strings, got {argv!r}")
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"exec timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(output_limit, bool) or not isinstance(output_limit, int) or \
                not 0 < output_limit <= MAX_OUTPUT_LIMIT:
            raise ConfigError(f"exec output_limit={output_limit!r}: use a number of bytes from 1 to "
                              f"{MAX_OUTPUT_LIMIT} ({MAX_OUTPUT_LIMIT >> 20} MiB)")
        if isinstance(input, str):
            input = input.encode()
        if input is not None and len(input) > MAX_STDIN:
            raise ConfigError(f"exec input is {len(input)} bytes; at most {MAX_STDIN} bytes fit one "
                              "request: put larger data in a guest file with vm.put() and read it there")
        assert self._agent is not None and self._qemu is not None
        first = "first_exec_ms" not in self.timings
        try:
            t0 = time.monotonic()
            result = self._agent.exec(argv, timeout=timeout, input=input, env=env, cwd=cwd,
                                      output_limit=output_limit)
            if first:
                self._time_first_exec(t0, result)
            return result
        except GuestError as exc:
            if self._qemu.fault is None and self._qemu.alive():
                raise
            with contextlib.suppress(subprocess.TimeoutExpired):  # cut off: its SIGKILL is on the way
                self._qemu.proc.wait(5)
            self.state = "failed"
            fault = f": {self._qemu.fault}" if self._qemu.fault else ""
            raise RestoreError(
                f"VM {self.name}: its QEMU (pid {self._qemu.pid}) exited {_exit_reason(self._qemu.proc.returncode)} "
                f"while running {argv}{fault}", console_tail=self.console_tail()
            ) from exc

    def _time_first_exec(self, t0: float, result: ExecResult) -> None:
        """``first_exec_ms`` and its stages: what a test waits for beyond the fork.

        ``rpc_ms``: the request's and reply's way through the control channel
        (host client, QEMU's virtio-serial, the guest agent's loop); ``spawn_ms``
        and ``run_ms``: the guest agent's own (start the program; run and reap it)."""
        total = _ms(t0)
        guest = max(result.duration_ms, 0.0)
        self.timings["first_exec_ms"] = total
        self.timings["first_exec"] = {
            "rpc_ms": round(max(total - guest, 0.0), 2),
            "spawn_ms": round(result.spawn_ms, 2),
            "run_ms": round(max(guest - result.spawn_ms, 0.0), 2),
        }

    def _running_agent(self, operation: str) -> AgentClient:
        if self.state != "running":
            raise StateError(operation, self.state, "running")
        assert self._agent is not None
        return self._agent

    def put(self, guest_path: str, data: files.Data, *, mode: int | None = None,
            timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Write a guest file: ``data`` is its content (bytes or str) or a host file
        (a ``pathlib.Path``). Streamed in 1 MiB chunks; see pytest_vmfork/vm/files.py."""
        files.put(self._running_agent("put"), guest_path, data, mode=mode, timeout=timeout)

    def get(self, guest_path: str, *, timeout: float = files.DEFAULT_TIMEOUT,
            max_bytes: int = files.MAX_GET_BYTES) -> bytes:
        """A guest file's content."""
        return files.get(self._running_agent("get"), guest_path, timeout=timeout, max_bytes=max_bytes)

    def put_tree(self, host_dir: "str | os.PathLike[str]", guest_dir: str, *,
                 timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Copy the contents of a host directory into ``guest_dir`` (modes and symlinks kept)."""
        files.put_tree(self._running_agent("put_tree"), host_dir, guest_dir, timeout=timeout)

    def get_tree(self, guest_dir: str, host_dir: "str | os.PathLike[str]", *,
                 timeout: float = files.DEFAULT_TIMEOUT) -> None:
        """Copy the contents of ``guest_dir`` into a host directory (modes and symlinks kept)."""
        files.get_tree(self._running_agent("get_tree"), guest_dir, host_dir, timeout=timeout)

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
        p = proc.spawn(self._running_agent("spawn"), self.name, argv, env=env, cwd=cwd, stdin=stdin,
                       output_limit=output_limit)
        self._processes.append(p)
        return p

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

    def read_mailbox(self, name: str) -> Any:
        """The JSON payload the guest received in mailbox ``name`` (None if none)."""
        import json

        require_mailboxes(self.forked_from, [name])
        assert self._agent is not None
        got = self._agent.read_mailbox(name)
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
        if self.state != "running":
            raise StateError("deliver", self.state, "running")
        payloads, acks = prepare_mailboxes(self.forked_from, mailboxes)
        if acks:
            raise ConfigError("deliver() does not wait for acks; poll the guest instead")
        assert self._qemu is not None
        t0 = time.monotonic()
        self._qemu.cmd("stop")
        self._rearm(payloads, timeout, "deliver()")
        self.timings["deliver_ms"] = _ms(t0)

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
        if self.state != "running":
            raise StateError("snapshot", self.state, "running")
        check_name(name)
        if not isinstance(resume, bool):
            raise ConfigError(f"snapshot(resume={resume!r}): use True or False")
        return self._save(name=name, resume=resume)

    def _save(self, *, name: str | None, resume: bool, key: str | None = None,
              extra: dict[str, Any] | None = None) -> Snapshot:
        assert self._qemu is not None
        qemu = self._qemu
        t0 = time.monotonic()
        qemu.cmd("stop")
        self.state = "paused"
        try:
            snap, timings = save_running(qemu, self.forked_from, run_id=self.run.run_id, key=key, name=name,
                                         extra={**self.snapshot_manifest, **(extra or {})})
        except BaseException:
            if not qemu.alive():
                self.state = "failed"
            elif resume:
                self._rearm({}, DEFAULT_READY_TIMEOUT, "a failed snapshot()")
            raise
        self.timings.update(timings)
        if resume:
            self._rearm({}, DEFAULT_READY_TIMEOUT, "snapshot()")
            self.timings["snapshot_pause_ms"] = _ms(t0)  # from stop to the guest's readiness signal
        return snap

    def _rearm(self, payloads: dict[str, bytes], timeout: float, what: str) -> None:
        """Resume the stopped VM as a new generation: system mailbox (entropy,
        clock) plus ``payloads`` written, then ``cont``; returns at readiness."""
        assert self._qemu is not None
        self.generation = secrets.randbits(52) | 1
        self._patch({mbx.SYSTEM_MAILBOX: self._system_payload(None, {}), **payloads})
        ready = self._qemu.expect_event(
            lambda f: f.get("event") in ("ready", "error") and f.get("gen") in (str(self.generation), None)
        )
        self._qemu.ring_doorbell()
        self._qemu.cmd("cont")
        try:
            fields = self._qemu.wait_event(ready, timeout)
        except (TimeoutError, EOFError) as exc:
            why = self._qemu.fault or f"no readiness signal within {timeout}s after {what}"
            raise RestoreError(f"fork {self.name}: {why}",
                               console_tail=self.console_tail()) from exc
        if fields.get("event") == "error":
            raise RestoreError(f"fork {self.name}: guest agent failed to resume after {what}: {fields}")
        self.state = "running"

    def host_port(self, guest_port: int) -> int:
        """A 127.0.0.1 port forwarded to ``guest_port`` (user-mode network only;
        with a TAP network connect to ``vm.ip`` directly)."""
        if self._network != "user":
            raise ConfigError(f"host_port() is for --vmfork-network=user; connect to vm.ip ({self.ip}) instead")
        if not isinstance(guest_port, int) or not 0 < guest_port < 65536:
            raise ConfigError(f"guest_port={guest_port!r}: use a TCP port from 1 to 65535")
        if guest_port not in self._forwards:
            assert self._qemu is not None
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            out = self._qemu.cmd(
                "human-monitor-command", **{"command-line": f"hostfwd_add net0 tcp:127.0.0.1:{port}-:{guest_port}"}
            )
            if out.strip():
                raise RestoreError(f"fork {self.name}: forwarding port {guest_port} failed: {out.strip()}")
            self._forwards[guest_port] = port
        return self._forwards[guest_port]

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
        for p in self._processes:
            p._forget()  # they die with QEMU: never an error
        if self._agent is not None:
            self._agent.close()
        if self._qemu is not None:
            self._qemu.kill()  # the TAP goes with QEMU's fd
        if self._acks is not None:
            self._acks.close()
        if self._lease is not None and isinstance(self._network, RunNetwork):
            self._network.release(self._lease)  # only now: QEMU is gone
            self._lease = None
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._own_run:
                self.run.remove()

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.name} {self.state} pid={self.pid}>"

    # --- restore --------------------------------------------------------------

    def _plumb(self, network: Network) -> tuple[list[str], tuple[int, ...], dict[str, Any] | None]:
        """Host side of the fork's NIC: QEMU netdev options, fds to pass, the
        handoff payload the guest applies on resume."""
        self._network = network
        if network is None or network == "none":
            return ["type=hubport", "hubid=0"], (), None
        if network == "user":
            self._acks = AckListener("127.0.0.1")
            self.ip, self.mac = "127.0.0.1", FORK_MAC
            payload = {"interface": "eth0", "mac": FORK_MAC, "ipv4": USER_GUEST_IP, "prefix": 24,
                       "gateway": USER_GATEWAY, "ack_host": USER_GATEWAY, "ack_port": self._acks.port}
            return user_netdev(net=USER_NET), (), payload
        if not isinstance(network, RunNetwork):
            raise ConfigError(f"network={network!r}: use 'none', 'user' or a RunNetwork")
        self._lease = lease = network.allocate(self.name)
        self.ip, self.mac = lease.ipv4, lease.mac
        self._acks = AckListener(network.gateway)
        fd = open_tap(lease.tap, network.bridge)
        payload = {"interface": "eth0", "mac": lease.mac, "ipv4": lease.ipv4, "prefix": lease.prefix,
                   "gateway": lease.gateway, "gateway_mac": network.gateway_mac, "ack_host": lease.gateway,
                   "ack_port": self._acks.port}
        return tap_netdev(fd), (fd,), payload

    def _prepare(self, network: Network) -> None:
        """Everything before the per-fork data: NIC plumbing, spawn, device state.

        A warm pool runs this ahead of time; the fork request then starts at
        :meth:`_resume`."""
        t0 = time.monotonic()
        snap = self.forked_from
        netdev, fds, self._net = self._plumb(network)
        try:
            handoff = Handoff(self.run.qemu())
            try:
                argv = snap.machine.argv(
                    handoff=handoff,
                    workdir=self.dir,
                    mem_path=snap.memory_path,
                    shared=False,
                    incoming=True,
                    netdev=netdev,
                    mac=FORK_MAC,
                    name=self.name,
                )
            except BaseException:
                handoff.close()
                raise
            qemu = self._qemu = QemuProcess.start(argv, self.dir, self.name, handoff=handoff, pass_fds=fds,
                                                  file_limit=FORK_FILE_LIMIT)
        finally:
            for fd in fds:
                os.close(fd)  # QEMU holds the TAP now; ours would keep it alive after QEMU
        write_handles(
            self.dir,
            {"name": self.name, "pid": qemu.pid, "start_time": qemu.start_time, "run_id": self.run.run_id,
             "tap": self._lease.tap if self._lease else None, "ip": self.ip, "qemu_uid": qemu.uid},
        )
        self.timings["spawn_ms"] = _ms(t0)
        qemu.cmd("migrate-set-parameters", **{"announce-rounds": 0})
        qemu.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True},
                          {"capability": "events", "state": True}],
        )
        qemu.migrate_from_file(snap.state_path)
        qemu.wait_migration(timeout=30)
        self.timings["load_ms"] = _ms(t0)
        self.state = "loaded"

    def _prewarm(self, ready_timeout: float, handoff_timeout: float) -> None:
        """Resume a prepared fork once, with no payloads, and run one command: a
        warm pool's forks do this before any request, so that the code paths a
        test's fork and first command run (resume, network apply, the control
        channel's session, a process spawn) are translated already (TCG) and
        paged in. The request then stops the vCPUs, patches its payloads in and
        resumes again, like :meth:`deliver`; its entropy, clock, generation and
        network handoff are its own."""
        t0 = time.monotonic()
        load_ms = self.timings["load_ms"]
        self._resume(t0, {}, {}, ready_timeout, handoff_timeout)
        self.exec(["true"], timeout=ready_timeout).check()
        self.timings = {"load_ms": load_ms, "prepare_ms": round(load_ms + _ms(t0), 2)}

    def _resume(
        self,
        t0: float,
        user_payloads: dict[str, bytes],
        acks: dict[str, float],
        ready_timeout: float,
        handoff_timeout: float,
    ) -> None:
        """Patch this fork's data in, resume it, wait for the guest's signals.
        A pre-warmed fork (running) is stopped first; its session stays."""
        qemu, net = self._qemu, self._net
        assert qemu is not None
        if self.state == "running":
            qemu.cmd("stop")
        t_patch = time.monotonic()
        self.generation = secrets.randbits(52) | 1
        self._patch({mbx.SYSTEM_MAILBOX: self._system_payload(net, acks), **user_payloads})
        self.timings["patch_ms"] = _ms(t_patch)

        ready = qemu.expect_event(
            lambda f: f.get("event") in ("ready", "error") and f.get("gen") in (str(self.generation), None)
        )
        qemu.ring_doorbell()
        qemu.cmd("cont")
        t_cont = time.monotonic()
        self.timings["resume_ms"] = _ms(t0)
        try:
            fields = qemu.wait_event(ready, ready_timeout)
        except (TimeoutError, EOFError) as exc:
            why = qemu.fault or ("QEMU exited" if not qemu.alive() else f"no readiness signal within {ready_timeout}s")
            raise RestoreError(f"fork {self.name}: {why}", console_tail=qemu.console_tail()) from exc
        if fields.get("event") == "error":
            raise RestoreError(
                f"fork {self.name}: guest agent failed to resume: {fields}", console_tail=qemu.console_tail()
            )
        self._time_resume(fields, t0, t_cont)
        self._agent = qemu.agent
        if net is not None:
            self._handoff(net, handoff_timeout, t_cont)
        for name, timeout in acks.items():
            t_ack = time.monotonic()
            assert self._acks is not None
            expect = {"stage": "applied", "mailbox": name, "gen": self.generation, "token": self.token}
            if self._acks.wait(expect, self._ack_sender(net), timeout) is None:
                raise AckTimeout(
                    f"fork {self.name}: mailbox {name!r} was not acknowledged within {timeout:g}s "
                    "(wait_for_ack=True)", console_tail=qemu.console_tail()
                )
            self.timings.setdefault("ack_ms", {})[name] = _ms(t_ack)
        self.timings["restore_to_healthy_ms"] = _ms(t0)
        self.state = "running"

    def _time_resume(self, fields: dict[str, str], t0: float, t_cont: float) -> None:
        """The guest's own view of its resume (the ready event): ``guest_resume_ms``
        from the doorbell to the ready line, ``guest_stages`` each stage's end in ms
        since the doorbell (gen, chan, entropy, clock, net.link, net.addr, net.route,
        net.neigh or pyroute2, ack, mailboxes), and ``guest_wake_ms``: from ``cont``
        to the doorbell seen (kernel resume, VMGenID, the agent woken), the rest."""
        ready_ms = _ms(t0)
        self.timings["guest_ready_ms"] = ready_ms
        try:
            resume = float(fields.get("resume_ms", "nan"))
        except ValueError:
            resume = float("nan")
        self.timings["guest_resume_ms"] = resume
        stages: dict[str, float] = {}
        for item in fields.get("stages", "").split(",")[:32]:  # untrusted: bounded, numbers only
            name, _, value = item.partition(":")
            try:
                stages[name[:32]] = float(value)
            except ValueError:
                continue
        self.timings["guest_stages"] = stages
        if not math.isnan(resume):
            self.timings["guest_wake_ms"] = round(max((time.monotonic() - t_cont) * 1000 - resume, 0.0), 2)

    def _ack_sender(self, net: dict[str, Any] | None) -> str:
        return "127.0.0.1" if self._network == "user" else str(net["ipv4"] if net else "")

    def _handoff(self, net: dict[str, Any], timeout: float, t_cont: float) -> None:
        """Confirm the guest applied its network: its UDP ack, else the control channel's fallback."""
        assert self._acks is not None and self._agent is not None and self._qemu is not None
        expect = {"stage": "applied", "mailbox": mbx.SYSTEM_MAILBOX, "gen": self.generation, "token": self.token}
        got = self._acks.wait(expect, self._ack_sender(net), timeout)
        if got is not None:
            self.timings["handoff_path"] = "ack"
            self.timings["guest_apply"] = got.get("path", "?")  # fast (pre-built netlink) or pyroute2
            self.timings["handoff_ms"] = _ms(t_cont)
            return
        self.timings["handoff_path"] = "ctl-fallback"
        config = pb.NetworkConfig(
            interface=net["interface"], mac=net["mac"], ipv4=net["ipv4"], prefix=int(net["prefix"]),
            gateway=net["gateway"], ack_port=int(net["ack_port"]), generation=self.generation,
        )
        try:
            self._agent.reconfigure_network(config, timeout=FALLBACK_TIMEOUT)
        except Exception as exc:
            raise HandoffError(
                f"fork {self.name}: network handoff failed: no ack within {timeout:g}s and the "
                f"ReconfigureNetwork fallback failed: {exc}", console_tail=self._qemu.console_tail()
            ) from exc
        self.timings["handoff_ms"] = _ms(t_cont)

    def _system_payload(self, net: dict[str, Any] | None, acks: dict[str, float]) -> bytes:
        """The built-in mailbox: generation, ack token, the control channel's session
        (docs/protocol.md), fresh entropy, the clock, the network."""
        assert self._qemu is not None
        return mbx.encode_payload(
            {
                "gen": self.generation,
                "chan": self._qemu.agent.session,
                "token": self.token,
                "entropy": secrets.token_hex(32),
                "time_ns": time.time_ns(),
                "net": net,
                "acks": {name: "guest" if name in self.forked_from.guest_acked else "agent" for name in acks},
            },
            name=mbx.SYSTEM_MAILBOX,
        )

    def _patch(self, payloads: dict[str, bytes]) -> None:
        """Write every payload, after checking every target (all or nothing)."""
        assert self._qemu is not None
        snap = self.forked_from
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


def _exit_reason(code: int | None) -> str:
    if code == -signal.SIGXFSZ:
        return (f"killed by signal {-code} (SIGXFSZ): its console log reached the limit of {FORK_FILE_LIMIT} "
                "bytes (the guest wrote too much to its serial console)")
    if code is not None and code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"with status {code}"


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
    network: Network = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT,
    pool: Pool | None = None,
) -> VM:
    """Restore a new VM from ``snapshot`` and return it once the guest is ready.

    ``mailboxes`` maps names the snapshot offers to JSON objects (or
    MailboxPayload). ``network`` is "none" (default), "user" or a RunNetwork
    that is up. With a ``pool`` (a WarmPool of this snapshot and network) the
    fork starts from a QEMU the pool restored and pre-warmed ahead of the
    request (see :meth:`VM._prewarm`), when it has one ready. The returned
    VM must be closed (``with fork(snap) as vm: ...``); on any failure the
    half-started fork is torn down before the error propagates.
    """
    t0 = time.monotonic()
    for name, value, upper in (("ready_timeout", ready_timeout, 600), ("handoff_timeout", handoff_timeout, 60)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
            raise ConfigError(f"{name}={value!r}: use seconds greater than 0 and at most {upper}")
    payloads, acks = prepare_mailboxes(snapshot, mailboxes)
    if acks and (network is None or network == "none"):
        raise ConfigError(
            f"mailbox {next(iter(acks))!r} waits for an ack, but acks travel over UDP and this fork "
            "has no network; use --vmfork-network=tap or user"
        )
    vm = pool.take(snapshot, network) if pool is not None else None
    if vm is not None:  # restored before the request: those stages cost it nothing
        vm.timings = {"pooled": True, "prewarmed": vm.state == "running",
                      "prepare_ms": vm.timings.get("prepare_ms", vm.timings["load_ms"]),
                      "pool_wait_ms": vm.timings.get("pool_wait_ms", 0.0), "spawn_ms": 0.0, "load_ms": 0.0}
    else:
        own_run = run is None
        run = run or Run()
        name, workdir = run.new_vm_dir("f")
        vm = VM(name, snapshot, run, workdir)
        vm._own_run = own_run  # a run made for this VM alone goes away with it
    try:
        if vm.state == "starting":
            vm._prepare(network)
        vm._resume(t0, payloads, acks, ready_timeout, handoff_timeout)
    except BaseException:
        console = vm.console_tail()
        vm.close()
        vm.state = "failed"
        vm.timings["console_tail"] = console
        raise
    return vm
