"""The VMM backend: a QEMU process, from its command line to its exit.

This module starts QEMU for a template boot or a fork restore and ends it; it
knows nothing of snapshots' caching or of pytest. Durable description
(``MachineSpec``: what the VM is) is kept apart from the transient handle
(``QemuProcess``: a PID, its channels, a console file). The channels are modules
of their own, the way qemu.qmp keeps the transport apart from the protocol: the
QMP monitor (vm/monitor.py), the guest's event channel and doorbell
(vm/events.py), the control channel's client (vm/agent.py, framing in
docs/protocol.md); ``QemuProcess`` holds one of each.

QEMU opens no path of ours (:mod:`pytest_vmfork.host.confine`): its QMP, event and
ctl channels are socketpairs made before the spawn (no polling for a socket
file: the QMP greeting arrives the moment QEMU is up), and its files are
inherited descriptors. Started by root, it runs as an unprivileged user. As the
ctl connection exists before the device state is loaded, the guest never sees
the port's host side close or open across a restore; the control channel's
random session id, announced on every resume, keeps a fork from taking what its
snapshot had in flight for a frame of its own.

Every error raised here is a VMForkError: a QEMU that cannot be found or run is
a ConfigError; one that does not come up a RestoreError (a file its command
line needs that cannot be opened: BuildError for a template). Writing into a
fork's memory is vm/procmem.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pytest_vmfork.errors import BuildError, ConfigError, RestoreError, VMForkError
from pytest_vmfork.host.confine import Handoff
from pytest_vmfork.host.procid import process_start_time
from pytest_vmfork.vm import qmploop
from pytest_vmfork.vm.agent import AgentClient
from pytest_vmfork.vm.events import EventChannel, Fields
from pytest_vmfork.vm.monitor import Monitor

QEMU_BINARY = "qemu-system-x86_64"
PORT_CTL = "org.vmfork.ctl"
PORT_EVT = "org.vmfork.evt"
CONSOLE_TAIL_LINES = 40
#: QEMU's seccomp filter, on for every QEMU (template and forks): no obsolete
#: system calls, no set*uid/gid, no fork/exec (device state goes through file
#: descriptors we open and pass, never ``exec:``), no scheduler/affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: RLIMIT_FSIZE of a fork's QEMU: the largest file it may write, i.e. its console
#: log (the guest decides what goes there) and its stderr. Beyond it writes fail:
#: the serial output is dropped (console_tail says so), or, if the write came from
#: a QEMU thread that does not block SIGXFSZ, QEMU dies and the fork fails naming it.
FORK_FILE_LIMIT = 8 * 1024 * 1024
#: TCG's translation buffer per QEMU, MiB (``-accel tcg,tb-size=``). QEMU 7.2
#: reserves 1 GiB (and charges it to the host's commit limit) and lets a fork's
#: translated code grow into all of it; 128 MiB holds 4x what a fork translates
#: up to its first exec (~30 MiB) and a dozen different commands after it (~94
#: MiB) without a flush, and caps a long-running fork there: a full buffer is
#: flushed and the guest's hot code translated again (16 MiB flushed 3 times in
#: the first exec and doubled it). Host memory only, not in the device state, so
#: a snapshot restores under any size. 0 keeps QEMU's default. README "Measured".
TCG_TB_SIZE_MIB = 128
#: Seconds a QEMU that closed its channels gets to exit before it is called alive.
EXIT_GRACE_S = 2.0
#: Seconds ``qemu --version`` and ``-machine help`` may take.
QUERY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MachineSpec:
    """Everything that shapes the virtual hardware. Template and forks must agree."""

    kernel: Path
    initrd: Path
    rootfs: Path
    cmdline: str
    memory_mib: int = 256
    vcpus: int = 1
    accel: str = "tcg"
    modules: Path | None = None  # the kernel's module tree (squashfs): /dev/vdb, mounted by the initramfs

    def argv(
        self,
        *,
        handoff: Handoff,
        workdir: Path,
        mem_path: Path,
        shared: bool,
        incoming: bool,
        netdev: list[str],
        mac: str,
        name: str,
    ) -> list[str]:
        """The QEMU command line; identical device layout for template and forks.

        Every file and socket is opened here into ``handoff`` (QEMU inherits them;
        it needs no access to ``workdir`` or the cache). A template (``shared``)
        creates its RAM file ``mem_path``; a fork maps the snapshot's privately.
        A file that cannot be opened is a RestoreError for a fork (``incoming``),
        a BuildError for a template."""
        accel = accel_option(self.accel, self.vcpus)
        if self.accel == "kvm":
            handoff.user.require_kvm()
        try:
            ram = handoff.ram(mem_path, self.memory_mib * 1024 * 1024, create=shared)
            console = handoff.fdset(workdir / "console.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            rootfs = handoff.fdset(self.rootfs, os.O_RDONLY)
            modules: list[str] = []
            if self.modules is not None:  # after the root disk: it probes as /dev/vdb
                drive = handoff.fdset(self.modules, os.O_RDONLY)
                modules = ["-drive", f"file={drive},if=none,id=modules,format=raw,readonly=on",
                           "-device", "virtio-blk-pci,drive=modules"]
            kernel, initrd = handoff.image(self.kernel), handoff.image(self.initrd)
            ctl, evt, qmp = (handoff.socket(chan) for chan in ("ctl", "evt", "qmp"))
        except OSError as exc:
            error = RestoreError if incoming else BuildError
            hint = " (removed while in use? run again to rebuild it)" if isinstance(exc, FileNotFoundError) else ""
            raise error(f"QEMU for {name}: cannot hand it {exc.filename or 'a file or socket'}: "
                        f"{exc.strerror}{hint}") from exc
        argv = [
            QEMU_BINARY,
            "-name", f"vmfork-{name},debug-threads=on",
            "-machine", "q35,memory-backend=ram0,smm=off,vmport=off,hpet=off",
            "-accel", accel,
            "-cpu", "max",
            "-smp", str(self.vcpus),
            "-m", f"{self.memory_mib}M",
            "-object",
            f"memory-backend-file,id=ram0,size={self.memory_mib}M,mem-path={ram},"
            f"share={'on' if shared else 'off'}",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            *handoff.options,
            "-chardev", f"file,id=con,path={console}",
            "-serial", "chardev:con",
            "-kernel", kernel,
            "-initrd", initrd,
            "-append", self.cmdline,
            "-drive", f"file={rootfs},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=root",
            *modules,
            "-device", "virtio-serial-pci,id=vser",
            "-chardev", f"socket,id=ctl,fd={ctl}",
            "-device", f"virtserialport,chardev=ctl,name={PORT_CTL}",
            "-chardev", f"socket,id=evt,fd={evt}",
            "-device", f"virtserialport,chardev=evt,name={PORT_EVT}",
            "-device", "virtio-rng-pci",
            "-device", f"vmgenid,guid={uuid.uuid4()}",
            "-netdev", ",".join(["id=net0", *netdev]),
            "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
            "-chardev", f"socket,id=qmp,fd={qmp}",
            "-mon", "chardev=qmp,mode=control",
            "-sandbox", SANDBOX,
        ]
        if incoming:
            argv += ["-incoming", "defer", "-S"]
        return argv


def accel_option(accel: str, vcpus: int, tb_size_mib: int | None = None) -> str:
    """The ``-accel`` value: under TCG, multi-threaded with more than one vCPU and a
    translation buffer of ``tb_size_mib`` (default :data:`TCG_TB_SIZE_MIB`);
    KVM has no translation buffer and gets its name alone."""
    if accel != "tcg":
        return accel
    opts = ["tcg"]
    if vcpus > 1:
        opts.append("thread=multi")
    size = TCG_TB_SIZE_MIB if tb_size_mib is None else tb_size_mib
    if size:
        opts.append(f"tb-size={size}")
    return ",".join(opts)


def _qemu_says(*args: str) -> str:
    """What QEMU prints for ``args``; ConfigError naming the fix when it is missing or cannot run."""
    exe = shutil.which(QEMU_BINARY)
    fix = "install Debian's qemu-system-x86 (apt-get install qemu-system-x86) or run `make setup`"
    if exe is None:
        raise ConfigError(f"{QEMU_BINARY} not found: {fix}")
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, check=True,
                             timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"`{exe} {' '.join(args)}` failed: {exc}; {fix}") from exc
    return out.stdout


@functools.lru_cache(maxsize=None)
def qemu_version() -> str:
    """QEMU's version string, part of the snapshot key (device state format)."""
    return _qemu_says("--version").splitlines()[0].strip()


@functools.lru_cache(maxsize=None)
def machine_type() -> str:
    """The versioned machine type ``q35`` stands for in this QEMU (e.g. ``pc-q35-7.2``):
    device state saved under one machine type loads only under the same one."""
    m = re.search(r"^q35\s.*\(alias of (\S+)\)", _qemu_says("-machine", "help"), re.MULTILINE)
    return m[1] if m else "q35"


def cpu_fingerprint(accel: str) -> str:
    """What the guest saw of the CPU: fixed per QEMU version under TCG (``-cpu max``),
    the host's model and flags under KVM (``-cpu max`` passes them through)."""
    if accel != "kvm":
        return "tcg-max"
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"kvm:{model}:{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


class QemuProcess:
    """A running QEMU: the process and our ends of its three channels.

    Created by :meth:`start`; always released by :meth:`kill` (idempotent).
    ``monitor`` is its QMP connection, ``events`` the guest's event channel,
    ``agent`` the control channel's client; the methods below that speak QMP or
    wait on the event channel delegate to them. ``fault`` is why the VM was cut
    off (a guest that broke a channel's bounds); its QEMU is then killed.
    """

    def __init__(
        self, name: str, workdir: Path, proc: subprocess.Popen[bytes], monitor: Monitor, events: EventChannel,
        *, file_limit: int | None, uid: int | None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.proc = proc
        self.monitor = monitor
        self.events = events
        self.start_time = process_start_time(proc.pid)
        self.file_limit = file_limit  # RLIMIT_FSIZE: the console log's bound
        self.uid = uid  # the uid QEMU runs as (confine.QemuUser)
        self.fault: str | None = None
        self.killed = False
        self.agent: AgentClient  # the control channel: set by start(), it reports faults to this object

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def console_path(self) -> Path:
        return self.workdir / "console.log"

    @classmethod
    def start(
        cls, argv: list[str], workdir: Path, name: str, *, handoff: Handoff, timeout: float = 20.0,
        pass_fds: tuple[int, ...] = (), file_limit: int | None = None,
    ) -> "QemuProcess":
        """Spawn QEMU as ``handoff.user`` and wait until its QMP monitor is up.
        ``argv`` was built with ``handoff`` (its descriptors are inherited; this
        process's copies are released, or everything closed if the start fails).
        ``pass_fds`` are inherited too (a TAP fd); the caller closes its copies.
        ``file_limit`` bounds every file QEMU writes (RLIMIT_FSIZE; a fork's
        console log), set before QEMU has run the guest at all. A QEMU that
        exits, does not answer or cannot be spawned is a RestoreError."""
        try:
            return qmploop.run(cls._start(argv, workdir, name, timeout, handoff, pass_fds, file_limit),
                               timeout=timeout + 5, what=f"starting QEMU for {name}")
        except BaseException as exc:
            handoff.close()
            if isinstance(exc, OSError):
                raise RestoreError(f"QEMU for {name} could not be started: {exc} "
                                   "(`vmfork doctor` checks what the host is missing)") from exc
            raise

    @classmethod
    async def _start(
        cls, argv: list[str], workdir: Path, name: str, timeout: float, handoff: Handoff,
        pass_fds: tuple[int, ...], file_limit: int | None,
    ) -> "QemuProcess":
        monitor = Monitor(name)
        log = os.fdopen(os.open(workdir / "qemu.stderr", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                | os.O_CLOEXEC, 0o600), "wb")
        # prlimit sets the file size limit before anything runs (as us: raising or setting
        # another uid's limit later needs CAP_SYS_RESOURCE); setpriv drops root
        # (confine.QemuUser.prefix) and then sets PR_SET_PDEATHSIG: QEMU dies with this
        # (long-lived) thread, so a killed pytest worker cannot leave VMs behind.
        limit = [] if file_limit is None else ["prlimit", f"--fsize={file_limit}:{file_limit}", "--"]
        try:
            proc = subprocess.Popen(
                [*limit, *handoff.user.prefix(), *argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
                pass_fds=(*pass_fds, *handoff.fds),
            )
        finally:
            log.close()
            handoff.release()  # QEMU holds its ends: a QEMU that exits is then EOF on ours
        try:
            qmp = handoff.sockets.pop("qmp")
            if not await monitor.accept(qmp, timeout, gone=lambda: proc.poll() is not None):
                with contextlib.suppress(subprocess.TimeoutExpired):  # its EOF came first: let it finish
                    proc.wait(2)
                why = f"exited with status {proc.returncode}" if proc.returncode is not None else (
                    f"did not answer on its QMP monitor within {timeout:.0f}s")
                raise RestoreError(f"QEMU for {name} {why}; its stderr:\n{_tail(workdir / 'qemu.stderr')}")
            events = await EventChannel.open(handoff.sockets.pop("evt"), name)
            self = cls(name, workdir, proc, monitor, events, file_limit=file_limit, uid=handoff.user.uid)
        except BaseException:
            _kill(proc)
            await monitor.disconnect()
            raise
        events.start(on_fault=self._cut_off)
        ctl = handoff.sockets.pop("ctl")
        ctl.setblocking(True)
        self.agent = AgentClient(ctl, name, on_fault=self._cut_off)
        return self

    def _cut_off(self, why: str) -> None:
        """The guest broke a channel's bounds: this fork is over (its QEMU is
        killed, so the guest cannot keep the host busy)."""
        self.fault = self.events.fault = f"{why}; its QEMU (pid {self.pid}) was killed"
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- the event channel ------------------------------------------------------------

    def expect_event(self, pred: Callable[[Fields], bool]) -> asyncio.Future[Fields]:
        """Register interest in a guest event *before* triggering it (no lost wake-ups)."""
        return self.events.expect(pred)

    def wait_event(self, fut: asyncio.Future[Fields], timeout: float) -> Fields:
        """Wait for a registered event: QemuTimeout (a TimeoutError) after ``timeout``
        seconds, EventChannelError (an EOFError) if the channel closed first."""
        return self.events.wait(fut, timeout)

    def ring_doorbell(self) -> None:
        """Queue the resume doorbell; the guest reads it the moment it runs."""
        self.events.ring_doorbell()

    # --- the QMP monitor ---------------------------------------------------------------

    def cmd(self, command: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute one QMP command and return its result."""
        return self.monitor.cmd(command, timeout, **args)

    def migrate_from_file(self, path: Path, timeout: float = 30.0) -> None:
        self.monitor.migrate_from_file(path, timeout)

    def migrate_to_file(self, path: Path, timeout: float = 30.0) -> None:
        self.monitor.migrate_to_file(path, timeout)

    def send_fd(self, fd: int, name: str) -> None:
        self.monitor.send_fd(fd, name)

    def wait_migration(self, timeout: float) -> None:
        self.monitor.wait_migration(timeout)

    def run_state(self) -> str:
        return self.monitor.run_state()

    # --- the process -------------------------------------------------------------------

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        tail = _tail(self.console_path, lines)
        try:
            full = self.file_limit is not None and self.console_path.stat().st_size >= self.file_limit
        except OSError:
            full = False
        if full:
            tail += (f"\n[vmfork: the console log reached its limit of {self.file_limit} bytes; "
                     "later console output was dropped]")
        return tail

    def alive(self) -> bool:
        """False once QEMU exited. A QEMU whose channels closed is exiting: it is given
        a moment to finish (its descriptors close one by one; a TAP's teardown waits
        for the network stack), so a dead QEMU is not reported as a live one."""
        if self.proc.poll() is None and (self.agent.closed or self.events.at_eof()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_GRACE_S)
        return self.proc.poll() is None

    def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; falls back to SIGKILL after ``timeout``."""
        try:
            self.cmd("quit", timeout=timeout)
        except VMForkError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self) -> None:
        """Kill QEMU and close our side of its channels. Never raises."""
        if self.killed:
            return
        self.killed = True
        _kill(self.proc)
        self.agent.close()

        async def close() -> None:
            await self.events.close()
            await self.monitor.disconnect()

        try:
            qmploop.run(close(), timeout=5)
        except Exception:
            pass


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, lines: int = CONSOLE_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return "(no console output)"
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:]) or "(no console output)"
