"""The restore engine: everything that starts a generation of a fork from a snapshot.

A :class:`ForkEngine` owns one fork's QEMU, network plumbing and lifecycle
(pytest_vmfork.vm.state); :class:`pytest_vmfork.vm.handle.VM` is the public handle
over it and the warm pool (pytest_vmfork.vm.pool) holds engines it prepared ahead.

The restore sequence (every step bounded; the guest signals readiness):

1. :meth:`ForkEngine.prepare`: spawn QEMU paused, waiting for incoming state; it
   connects QMP and the event channel to sockets we already listen on (no polling
   for files); ``announce-rounds=0`` (a fork must not broadcast the template's
   MAC/IP), ``x-ignore-shared`` (RAM comes from the privately mapped snapshot
   file), then load the ~1 MB device state;
2. :meth:`ForkEngine.resume`, the one way a generation starts (a fork, a warm
   pool's pre-warm, ``vm.deliver()``, the resume after ``vm.snapshot()``): patch
   the mailboxes (system: entropy, clock, generation; user payloads) into this
   QEMU's private copy of guest RAM through /proc/<pid>/mem, queue the resume
   doorbell on the event channel and ``cont``, wait for the agent's
   ``event=ready gen=<generation>`` line, then (a fork's resume) confirm the
   network handoff and the acks asked for.

``restore_to_healthy_ms`` runs from the fork request to the end of step 2.
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
from pathlib import Path
from typing import Any, Union

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.errors import AckTimeout, ConfigError, HandoffError, RestoreError
from pytest_vmfork.host.confine import Handoff
from pytest_vmfork.host.run import Run, write_handles
from pytest_vmfork.net.forkleases import ForkLease
from pytest_vmfork.net.network import USER_NET, AckListener, RunNetwork, open_tap, tap_netdev, user_netdev
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.vm.agent import AgentClient
from pytest_vmfork.vm.layer import save_running
from pytest_vmfork.vm.procmem import ProcMem
from pytest_vmfork.vm.snapshot import Snapshot, ignore_shared
from pytest_vmfork.vm.state import Lifecycle, VMState
from pytest_vmfork.vm.vmm import FORK_FILE_LIMIT, QemuProcess

DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_HANDOFF_TIMEOUT = 2.0  # the guest acks before it says ready: this only bounds a lost ack
FALLBACK_TIMEOUT = 10.0
FORK_MAC = "52:54:00:00:00:01"  # the device keeps the template's MAC until the guest changes it
USER_GUEST_IP, USER_GATEWAY = "10.0.2.15", "10.0.2.2"  # QEMU user-mode defaults (USER_NET)

#: ``network=`` for :func:`pytest_vmfork.vm.fork.fork`: "none", "user" (QEMU user-mode,
#: no privileges) or a RunNetwork that is up (a TAP on the run's bridge).
Network = Union[str, RunNetwork, None]


def elapsed_ms(since: float) -> float:
    """Milliseconds since the ``time.monotonic()`` reading ``since``, rounded for reports."""
    return round((time.monotonic() - since) * 1000, 2)


class ForkEngine:
    """One fork's QEMU and what restores it: its network, its mailboxes, its state.

    ``timings`` collects the figures of its restore (docs/performance.md). Not
    thread-safe: one caller at a time (the pool hands an engine over whole)."""

    def __init__(self, name: str, snapshot: Snapshot, run: Run, workdir: Path, *, own_run: bool = False) -> None:
        self.name = name
        self.snapshot = snapshot
        self.run = run
        self.dir = workdir
        self.own_run = own_run  # a run made for this fork alone goes away with it
        self.lifecycle = Lifecycle(name)
        self.generation = 0
        self.timings: dict[str, Any] = {}
        self.ip: str | None = None
        self.mac: str | None = None
        self.token = secrets.token_hex(8)
        self.network: Network = None
        self._qemu: QemuProcess | None = None
        self._agent: AgentClient | None = None
        self._net: dict[str, Any] | None = None
        self._lease: ForkLease | None = None
        self._acks: AckListener | None = None
        self._forwards: dict[int, int] = {}

    @property
    def state(self) -> VMState:
        return self.lifecycle.state

    @property
    def pid(self) -> int | None:
        return self._qemu.pid if self._qemu else None

    @property
    def qemu(self) -> QemuProcess | None:
        """The QEMU process (None before :meth:`prepare`): for benchmarks that read its stats."""
        return self._qemu

    @property
    def tap(self) -> str | None:
        """The host TAP device of a fork on a RunNetwork (None otherwise, or once released)."""
        return self._lease.tap if self._lease else None

    def running_agent(self, operation: str) -> AgentClient:
        """The guest agent's client, for ``operation`` that needs a running guest."""
        self.lifecycle.check(operation, VMState.RUNNING)
        assert self._agent is not None
        return self._agent

    # --- before the request ----------------------------------------------------

    def _plumb(self, network: Network) -> tuple[list[str], tuple[int, ...], dict[str, Any] | None]:
        """Host side of the fork's NIC: QEMU netdev options, fds to pass, the
        handoff payload the guest applies on resume."""
        self.network = network
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

    def prepare(self, network: Network) -> None:
        """Everything before the per-fork data: NIC plumbing, spawn, device state.

        A warm pool runs this ahead of time; the fork request then starts at :meth:`resume`."""
        self.lifecycle.check("prepare", VMState.STARTING)
        t0 = time.monotonic()
        snap = self.snapshot
        netdev, fds, self._net = self._plumb(network)
        try:
            handoff = Handoff(self.run.qemu())
            try:
                argv = snap.machine.argv(handoff=handoff, workdir=self.dir, mem_path=snap.memory_path, shared=False,
                                         incoming=True, netdev=netdev, mac=FORK_MAC, name=self.name)
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
             "tap": self.tap, "ip": self.ip, "qemu_uid": qemu.uid},
        )
        self.timings["spawn_ms"] = elapsed_ms(t0)
        qemu.cmd("migrate-set-parameters", **{"announce-rounds": 0})
        ignore_shared(qemu)
        qemu.migrate_from_file(snap.state_path)
        qemu.wait_migration(timeout=30)
        self.timings["load_ms"] = elapsed_ms(t0)
        self.lifecycle.move(VMState.LOADED)

    def prewarm(self, ready_timeout: float, handoff_timeout: float) -> None:
        """Resume a prepared fork once, with no payloads, and run one command: a
        warm pool's forks do this before any request, so that the code paths a
        test's fork and first command run (resume, network apply, the control
        channel's session, a process spawn) are translated already (TCG) and
        paged in. The request then stops the vCPUs, patches its payloads in and
        resumes again (:meth:`resume`); its entropy, clock, generation and
        network handoff are its own."""
        t0 = time.monotonic()
        load_ms = self.timings["load_ms"]
        self.resume({}, ready_timeout=ready_timeout, handoff_timeout=handoff_timeout, since=t0)
        self.running_agent("prewarm").exec(["true"], timeout=ready_timeout).check()
        self.timings = {"load_ms": load_ms, "prepare_ms": round(load_ms + elapsed_ms(t0), 2)}

    # --- a generation ------------------------------------------------------------

    def stop(self) -> None:
        """Stop the vCPUs of the running guest (running -> paused)."""
        self.lifecycle.check("stop", VMState.RUNNING)
        assert self._qemu is not None
        self._qemu.cmd("stop")
        self.lifecycle.move(VMState.PAUSED)

    def resume(
        self,
        payloads: dict[str, bytes],
        *,
        ready_timeout: float,
        handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT,
        acks: dict[str, float] | None = None,
        since: float | None = None,
        after: str | None = None,
    ) -> None:
        """Start a new generation: patch the system mailbox (generation, entropy,
        clock, network) and ``payloads`` in, ``cont``, wait for the guest's ready
        signal. A running guest is stopped first.

        ``after`` names what re-resumes a fork that ran already in this memory
        (``"deliver()"``, ``"snapshot()"``): its network stays as it is and the
        fork's restore timings are left alone. Without it this is a fork's resume
        (timed from ``since``, the request): the network is handed over and the
        ``acks`` (mailbox name -> timeout) are awaited. Any failure leaves the
        fork failed."""
        self.lifecycle.check("resume", VMState.LOADED, VMState.PAUSED, VMState.RUNNING)
        t0 = time.monotonic() if since is None else since
        try:
            if self.lifecycle.state is VMState.RUNNING:
                self.stop()
            self._resume(t0, payloads, acks or {}, ready_timeout, handoff_timeout, after)
        except BaseException:
            self.fail()
            raise
        self.lifecycle.move(VMState.RUNNING)

    def _resume(self, t0: float, user_payloads: dict[str, bytes], acks: dict[str, float], ready_timeout: float,
                handoff_timeout: float, after: str | None) -> None:
        qemu = self._qemu
        assert qemu is not None
        net = self._net if after is None else None
        timings = self.timings if after is None else {}  # a re-resume is timed by its caller
        t_patch = time.monotonic()
        self.generation = secrets.randbits(52) | 1
        self.timings["mailbox_path"] = self._patch({mbx.SYSTEM_MAILBOX: self._system_payload(net, acks), **user_payloads})
        timings["patch_ms"] = elapsed_ms(t_patch)

        ready = qemu.expect_event(
            lambda f: f.get("event") in ("ready", "error") and f.get("gen") in (str(self.generation), None)
        )
        qemu.ring_doorbell()
        qemu.cmd("cont")
        t_cont = time.monotonic()
        timings["resume_ms"] = elapsed_ms(t0)
        where = f" after {after}" if after else ""
        try:
            fields = qemu.wait_event(ready, ready_timeout)
        except (TimeoutError, EOFError) as exc:
            why = qemu.fault or ("QEMU exited" if not qemu.alive() else
                                 f"no readiness signal within {ready_timeout}s{where}")
            raise RestoreError(f"fork {self.name}: {why}", console_tail=qemu.console_tail()) from exc
        if fields.get("event") == "error":
            raise RestoreError(f"fork {self.name}: guest agent failed to resume{where}: {fields}",
                               console_tail=qemu.console_tail())
        self._agent = qemu.agent
        if after is not None:
            return
        self._time_resume(fields, t0, t_cont)
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
            self.timings.setdefault("ack_ms", {})[name] = elapsed_ms(t_ack)
        self.timings["restore_to_healthy_ms"] = elapsed_ms(t0)

    def _time_resume(self, fields: dict[str, str], t0: float, t_cont: float) -> None:
        """The guest's own view of its resume (the ready event): ``guest_resume_ms``
        from the doorbell to the ready line, ``guest_stages`` each stage's end in ms
        since the doorbell (gen, chan, entropy, clock, net.link, net.addr, net.route,
        net.neigh or pyroute2, ack, mailboxes), and ``guest_wake_ms``: from ``cont``
        to the doorbell seen (kernel resume, VMGenID, the agent woken), the rest."""
        self.timings["guest_ready_ms"] = elapsed_ms(t0)
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
        return "127.0.0.1" if self.network == "user" else str(net["ipv4"] if net else "")

    def _handoff(self, net: dict[str, Any], timeout: float, t_cont: float) -> None:
        """Confirm the guest applied its network: its UDP ack, else the control channel's fallback."""
        assert self._acks is not None and self._agent is not None and self._qemu is not None
        expect = {"stage": "applied", "mailbox": mbx.SYSTEM_MAILBOX, "gen": self.generation, "token": self.token}
        got = self._acks.wait(expect, self._ack_sender(net), timeout)
        if got is not None:
            self.timings["handoff_path"] = "ack"
            self.timings["guest_apply"] = got.get("path", "?")  # fast (pre-built netlink) or pyroute2
            self.timings["handoff_ms"] = elapsed_ms(t_cont)
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
        self.timings["handoff_ms"] = elapsed_ms(t_cont)

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
                "acks": {name: "guest" if name in self.snapshot.guest_acked else "agent" for name in acks},
            },
            name=mbx.SYSTEM_MAILBOX,
        )

    def _patch(self, payloads: dict[str, bytes]) -> str:
        """Write every payload, after checking every target (all or nothing). Returns
        how the mailboxes were found: "direct" (their recorded offsets) or "scan"."""
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
        return path

    # --- saves, failures, teardown -------------------------------------------------

    def save(self, *, name: str | None, resume: bool, key: str | None = None,
             extra: dict[str, Any] | None = None) -> Snapshot:
        """Stop the running guest and save it as a snapshot (pytest_vmfork.vm.layer);
        then resume it as a new generation, or leave it paused. A failed save
        resumes it too, if its QEMU lives."""
        qemu = self._qemu
        assert qemu is not None
        t0 = time.monotonic()
        self.stop()
        try:
            snap, timings = save_running(qemu, self.snapshot, run_id=self.run.run_id, key=key, name=name,
                                         extra=extra)
        except BaseException:
            if not qemu.alive():
                self.fail()
            elif resume:
                self.resume({}, ready_timeout=DEFAULT_READY_TIMEOUT, after="a failed snapshot()")
            raise
        self.timings.update(timings)
        if resume:
            self.resume({}, ready_timeout=DEFAULT_READY_TIMEOUT, after="snapshot()")
            self.timings["snapshot_pause_ms"] = elapsed_ms(t0)  # from stop to the guest's readiness signal
        return snap

    def host_port(self, guest_port: int) -> int:
        """A 127.0.0.1 port forwarded to ``guest_port`` (user-mode network only)."""
        if self.network != "user":
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

    def fail(self) -> None:
        """Mark the fork failed (its QEMU died, a resume failed): only close() is left.
        A closed fork stays closed."""
        if self.lifecycle.can_move(VMState.FAILED):
            self.lifecycle.move(VMState.FAILED)

    def failure(self, during: str) -> RestoreError | None:
        """After a guest call failed: if it failed because QEMU died (or was cut off
        for breaking its bounds), mark the fork failed and return the error that
        says so (``during``: what was going on); None if QEMU is fine."""
        qemu = self._qemu
        if qemu is None or (qemu.fault is None and qemu.alive()):
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):  # cut off: its SIGKILL is on the way
            qemu.proc.wait(5)
        self.fail()
        fault = f": {qemu.fault}" if qemu.fault else ""
        return RestoreError(f"VM {self.name}: its QEMU (pid {qemu.pid}) exited {exit_reason(qemu.proc.returncode)} "
                            f"{during}{fault}", console_tail=self.console_tail())

    def console_tail(self, lines: int = 40) -> str:
        return self._qemu.console_tail(lines) if self._qemu else ""

    def alive(self) -> bool:
        return self._qemu is not None and self._qemu.alive()

    def close(self, *, keep_files: bool = False) -> None:
        """Kill the VMM, release the network and remove the fork's files (unless
        ``keep_files``). Idempotent; never raises."""
        if self.lifecycle.state is VMState.CLOSED:
            return
        self.lifecycle.move(VMState.CLOSED)
        if self._agent is not None:
            self._agent.close()
        if self._qemu is not None:
            self._qemu.kill()  # the TAP goes with QEMU's fd
        if self._acks is not None:
            self._acks.close()
        if self._lease is not None and isinstance(self.network, RunNetwork):
            self.network.release(self._lease)  # only now: QEMU is gone
            self._lease = None
        if not keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.own_run:
                self.run.remove()


def exit_reason(code: int | None) -> str:
    """How a QEMU ended, for an error message (SIGXFSZ: its console log hit the limit)."""
    if code == -signal.SIGXFSZ:
        return (f"killed by signal {-code} (SIGXFSZ): its console log reached the limit of {FORK_FILE_LIMIT} "
                "bytes (the guest wrote too much to its serial console)")
    if code is not None and code < 0:
        return f"killed by signal {-code} ({signal.Signals(-code).name})"
    return f"with status {code}"


def _scan(memory_path: Path, want: bytes) -> int:
    with open(memory_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return mbx.find(m, want)
