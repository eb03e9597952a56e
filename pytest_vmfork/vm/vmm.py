"""The VMM backend: QEMU processes, their QMP monitor and event channel.

This module knows how to start QEMU for a template boot or a fork restore and
how to talk to it; it knows nothing of snapshots' caching or of pytest.

Durable description (``MachineSpec``: what the VM is) is kept apart from the
transient handle (``QemuProcess``: a PID, sockets, a console file).

QEMU opens no path of ours (:mod:`pytest_vmfork.host.confine`): its QMP, event and
ctl channels are socketpairs made before the spawn (so there is no polling for
a socket file: the QMP greeting arrives the moment QEMU is up), and its files
are inherited descriptors. Started by root, it runs as an unprivileged user.

Because QEMU's ctl connection exists before the device state is loaded, the
guest never sees the virtio-serial port's host side close or open across a
restore. Our end of it is the control channel's client (pytest_vmfork/vm/agent.py,
framing in docs/protocol.md); its random session id, announced to the guest on
every resume, keeps a fork from taking anything its snapshot had in flight for
a frame of its own.
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
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qemu.qmp import QMPClient

from pytest_vmfork.errors import ConfigError, RestoreError
from pytest_vmfork.host.confine import Handoff
from pytest_vmfork.net.leases import process_start_time
from pytest_vmfork.vm import qmploop as _loop
from pytest_vmfork.vm.agent import AgentClient

QEMU_BINARY = "qemu-system-x86_64"
PORT_CTL = "org.vmfork.ctl"
PORT_EVT = "org.vmfork.evt"
DOORBELL = b"R"
CONSOLE_TAIL_LINES = 40
#: QEMU's seccomp filter, on for every QEMU (template and forks): no obsolete
#: system calls, no set*uid/gid, no fork/exec (device state goes through file
#: descriptors we open and pass, never ``exec:``), no scheduler/affinity changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: Bounds on the guest's event channel (untrusted input): the longest line, and
#: a token bucket of lines (a fork emits a handful; a flood is an attack or a bug).
MAX_EVENT_LINE = 4096
EVENT_RATE_PER_S = 200.0
EVENT_BURST = 400
EVENT_LINES_KEPT = 64
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


class EventChannelError(EOFError):
    """The guest broke the event channel's bounds; its QEMU was killed."""


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
        creates its RAM file ``mem_path``; a fork maps the snapshot's privately."""
        accel = accel_option(self.accel, self.vcpus)
        if self.accel == "kvm":
            handoff.user.require_kvm()
        ram = handoff.ram(mem_path, self.memory_mib * 1024 * 1024, create=shared)
        console = handoff.fdset(workdir / "console.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        rootfs = handoff.fdset(self.rootfs, os.O_RDONLY)
        modules = [] if self.modules is None else [  # after the root disk: it probes as /dev/vdb
            "-drive", f"file={handoff.fdset(self.modules, os.O_RDONLY)},if=none,id=modules,format=raw,readonly=on",
            "-device", "virtio-blk-pci,drive=modules"]
        kernel, initrd = handoff.image(self.kernel), handoff.image(self.initrd)
        ctl, evt, qmp = (handoff.socket(chan) for chan in ("ctl", "evt", "qmp"))
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


@functools.lru_cache(maxsize=None)
def qemu_version() -> str:
    """QEMU's version string, part of the snapshot key (device state format)."""
    exe = shutil.which(QEMU_BINARY)
    if exe is None:
        raise ConfigError(
            f"{QEMU_BINARY} not found: install Debian's qemu-system-x86 "
            "(apt-get install qemu-system-x86) or run `make setup`"
        )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


@functools.lru_cache(maxsize=None)
def machine_type() -> str:
    """The versioned machine type ``q35`` stands for in this QEMU (e.g. ``pc-q35-7.2``):
    device state saved under one machine type loads only under the same one."""
    exe = shutil.which(QEMU_BINARY) or QEMU_BINARY
    out = subprocess.run([exe, "-machine", "help"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"^q35\s.*\(alias of (\S+)\)", out, re.MULTILINE)
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


@dataclass
class QemuProcess:
    """A running QEMU: the transient handles of one VM.

    Created by :meth:`start`; always released by :meth:`kill` (idempotent).
    """

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    qmp: QMPClient
    start_time: int
    evt_reader: asyncio.StreamReader
    evt_writer: asyncio.StreamWriter
    agent: AgentClient  # the control channel
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=EVENT_LINES_KEPT))
    fault: str | None = None  # why the guest's event channel was cut off
    file_limit: int | None = None  # RLIMIT_FSIZE: the console log's bound
    uid: int | None = None  # the uid QEMU runs as (confine.QemuUser)
    _line_waiters: list[tuple[Callable[[dict[str, str]], bool], asyncio.Future[dict[str, str]]]] = field(
        default_factory=list
    )
    _pump: asyncio.Task[None] | None = None
    killed: bool = False

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
        console log), set before QEMU has run the guest at all."""
        try:
            return _loop.run(cls._start(argv, workdir, name, timeout, handoff, pass_fds, file_limit),
                             timeout=timeout + 5)
        except BaseException:
            handoff.close()
            raise

    @classmethod
    async def _start(
        cls, argv: list[str], workdir: Path, name: str, timeout: float, handoff: Handoff,
        pass_fds: tuple[int, ...], file_limit: int | None,
    ) -> "QemuProcess":
        qmp = QMPClient(name)
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
            accept = asyncio.ensure_future(qmp.connect(handoff.sockets.pop("qmp")))
            deadline = time.monotonic() + timeout
            while not accept.done():
                # Wake on the greeting at once; look at the process only to fail fast
                # when QEMU exits on a bad command line.
                await asyncio.wait({accept}, timeout=0.05)
                if not accept.done() and (proc.poll() is not None or time.monotonic() > deadline):
                    accept.cancel()
                    break
            if not accept.done() or accept.cancelled() or accept.exception() is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):  # its EOF came first: let it finish
                    proc.wait(2)
                why = f"exited with status {proc.returncode}" if proc.returncode is not None else (
                    f"did not answer on its QMP monitor within {timeout:.0f}s")
                raise RestoreError(f"QEMU for {name} {why}; its stderr:\n{_tail(workdir / 'qemu.stderr')}")
            reader, writer = await asyncio.open_unix_connection(sock=handoff.sockets.pop("evt"))
        except BaseException:
            _kill(proc)
            await qmp.disconnect()
            raise
        self = cls(
            name=name,
            workdir=workdir,
            proc=proc,
            qmp=qmp,
            start_time=process_start_time(proc.pid),
            evt_reader=reader,
            evt_writer=writer,
            agent=None,  # type: ignore[arg-type]  # set below: it reports faults to this object
            file_limit=file_limit,
            uid=handoff.user.uid,
        )
        self._pump = asyncio.ensure_future(self._pump_lines())
        ctl = handoff.sockets.pop("ctl")
        ctl.setblocking(True)
        self.agent = AgentClient(ctl, name, on_fault=self._cut_off)
        return self

    async def _pump_lines(self) -> None:
        """Dispatch ``vmfork-evt k=v ...`` lines from the guest to waiters.

        The guest is untrusted: a line longer than MAX_EVENT_LINE or more lines
        than the token bucket allows (EVENT_RATE_PER_S, EVENT_BURST) kill this
        QEMU and fail its waiters with EventChannelError naming the cause; at
        most one line and EVENT_LINES_KEPT past lines are held in memory."""
        buf = b""
        tokens, last = float(EVENT_BURST), time.monotonic()
        while self.fault is None:
            chunk = await self.evt_reader.read(65536)
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            if len(buf) > MAX_EVENT_LINE or any(len(raw) > MAX_EVENT_LINE for raw in complete):
                self._cut_off(f"the guest sent an event line longer than {MAX_EVENT_LINE} bytes")
                break
            now = time.monotonic()
            tokens = min(float(EVENT_BURST), tokens + (now - last) * EVENT_RATE_PER_S) - len(complete)
            last = now
            if tokens < 0:
                self._cut_off(f"the guest flooded the event channel (more than {EVENT_BURST} lines at once "
                              f"or {EVENT_RATE_PER_S:g} lines/s)")
                break
            for raw in complete:
                self._dispatch(raw.decode("ascii", "replace").strip())
        error = EventChannelError(f"event channel closed: {self.fault or 'QEMU exited'}")
        for _, fut in self._line_waiters:
            if not fut.done():
                fut.set_exception(error)

    def _dispatch(self, text: str) -> None:
        self.lines.append(text)
        if not text.startswith("vmfork-evt "):
            return
        fields = dict(tok.partition("=")[::2] for tok in text.split(" ")[1:] if "=" in tok)
        for pred, fut in list(self._line_waiters):
            if not fut.done() and pred(fields):
                fut.set_result(fields)

    def _cut_off(self, why: str) -> None:
        """The guest broke the channel's bounds: this fork is over (its QEMU is
        killed, so the guest cannot keep the host busy)."""
        self.fault = f"{why}; its QEMU (pid {self.pid}) was killed"
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def expect_event(self, pred: Callable[[dict[str, str]], bool]) -> asyncio.Future[dict[str, str]]:
        """Register interest in a guest event *before* triggering it (no lost wake-ups)."""

        async def register() -> asyncio.Future[dict[str, str]]:
            fut: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
            self._line_waiters.append((pred, fut))
            if self._pump is not None and self._pump.done():
                fut.set_exception(EventChannelError(f"event channel closed: {self.fault or 'QEMU exited'}"))
            return fut

        return _loop.run(register())

    def wait_event(self, fut: asyncio.Future[dict[str, str]], timeout: float) -> dict[str, str]:
        """Wait for a registered event; TimeoutError after ``timeout`` seconds."""

        async def wait() -> dict[str, str]:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            finally:
                if fut.done():
                    self._line_waiters[:] = [w for w in self._line_waiters if w[1] is not fut]

        return _loop.run(wait())

    def ring_doorbell(self) -> None:
        """Queue the resume doorbell; the guest reads it the moment it runs."""

        async def ring() -> None:
            self.evt_writer.write(DOORBELL)
            await self.evt_writer.drain()

        _loop.run(ring(), timeout=5)

    def cmd(self, command: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute one QMP command and return its result."""
        return _loop.run(self.qmp.execute(command, args or None), timeout=timeout)

    def migrate_from_file(self, path: Path, timeout: float = 30.0) -> None:
        """Start loading the device state from ``path`` (an incoming migration).

        The file is opened here and handed to QEMU over QMP (``getfd``): QEMU's
        sandbox denies spawning the ``exec:cat`` helper, and QEMU needs no access
        to the path."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            _loop.run(self._pass_fd(fd, "state"), timeout=timeout)
        finally:
            os.close(fd)
        self.cmd("migrate-incoming", timeout=timeout, uri="fd:state")

    def migrate_to_file(self, path: Path, timeout: float = 30.0) -> None:
        """Start saving the device state to ``path`` (created, never through a
        symlink or over an existing file), passed to QEMU as a descriptor."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _loop.run(self._pass_fd(fd, "state"), timeout=timeout)
        finally:
            os.close(fd)
        self.cmd("migrate", timeout=timeout, uri="fd:state")

    async def _pass_fd(self, fd: int, name: str) -> None:
        self.qmp.send_fd_scm(fd)
        await self.qmp.execute("getfd", {"fdname": name})

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of ``fd`` (SCM_RIGHTS over QMP) under ``name``, for ``fd:<name>`` URIs."""
        _loop.run(self._pass_fd(fd, name), timeout=10)

    def wait_migration(self, timeout: float) -> None:
        """Wait until an incoming or outgoing migration completes (MIGRATION events)."""

        async def wait() -> None:
            while True:
                status = (await self.qmp.execute("query-migrate")).get("status")  # type: ignore[union-attr]
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise RestoreError(f"migration of {self.name} {status}: {await self._migrate_error()}")
                try:
                    event = await asyncio.wait_for(self.qmp.events.get(), 0.5)
                except asyncio.TimeoutError:
                    continue  # re-query: an event may have fired before we listened
                if event["event"] != "MIGRATION":
                    continue

        _loop.run(wait(), timeout=timeout)

    async def _migrate_error(self) -> str:
        info = await self.qmp.execute("query-migrate")
        return str(info.get("error-desc", info))  # type: ignore[union-attr]

    def run_state(self) -> str:
        return str(self.cmd("query-status")["status"])

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
        if self.proc.poll() is None and (self.agent.closed or self.evt_reader.at_eof()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_GRACE_S)
        return self.proc.poll() is None

    def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; falls back to SIGKILL after ``timeout``."""
        try:
            self.cmd("quit", timeout=timeout)
        except Exception:
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
            self.evt_writer.close()
            if self._pump is not None:
                self._pump.cancel()
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 2)
            except Exception:
                pass

        try:
            _loop.run(close(), timeout=5)
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


class ProcMem:
    """Write into a running QEMU's private mapping of the RAM file.

    Writing through /proc/<pid>/mem changes only that process's copy-on-write
    pages: the snapshot's memory file, shared by every fork, never changes.
    """

    def __init__(self, pid: int, mem_path: Path) -> None:
        self.pid = pid
        self.base = self._mapping_start(pid, mem_path)

    @staticmethod
    def _mapping_start(pid: int, mem_path: Path) -> int:
        target = os.path.realpath(mem_path)  # maps shows the resolved path
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target and parts[2] == "00000000":
                    return int(parts[0].split("-")[0], 16)
        raise RestoreError(f"QEMU pid {pid} has no mapping of {target}")

    def write(self, writes: list[tuple[int, bytes]]) -> None:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR)
        try:
            for off, data in writes:
                if os.pwrite(fd, data, self.base + off) != len(data):
                    raise RestoreError(f"short write into QEMU pid {self.pid} memory")
        finally:
            os.close(fd)

    def read(self, off: int, size: int) -> bytes:
        fd = os.open(f"/proc/{self.pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, self.base + off)
        finally:
            os.close(fd)


def monotonic_ms(since: float) -> float:
    return round((time.monotonic() - since) * 1000, 2)
