"""Garbage collection: clean up what dead runs left on this host.

A run that dies without its teardown (SIGKILL, OOM, a crashed CI job, a
second Ctrl-C during teardown, an xdist worker killed) can leave behind:

- QEMU processes (normally killed by PR_SET_PDEATHSIG, unless setpriv could not
  set it or the process outlived its owner some other way);
- VM directories (``<run root>/<run>/<vm>/`` with sockets, console log,
  ``handles.json``) and run directories (``<run root>/<run>/owner.json``);
- host-wide subnet leases with their bridges, half-finished reclaims
  (tombstones) and per-run lease directories (``<lease root>/runs/<run>/``);
- TAPs that no process holds (only a persistent TAP can be in that state);
- partial snapshot, image and Debian root builds (``.staging-*``, ``.trash-*``, ``.old-*``).

:func:`collect` finds and removes them. Everything is judged by its owner's
identity (PID *and* start time, boot id: :func:`pytest_vmfork.host.procid.owner_gone`),
so a recycled PID or a zombie never makes a dead run look alive, and nothing
of a live run is ever touched. Locks are taken with short timeouts; what is
locked is skipped and reported. ``<run root>/kept/`` (``--vmfork-keep-failed``)
is only removed with ``include_kept=True``.

What gc reads is trusted only from a verified private run root
(:mod:`pytest_vmfork.host.private`), and a process is killed only if it is a QEMU of
ours: the recorded start time, argv[0] ``qemu-system-*``, ``-name
vmfork-<the VM's name>`` and this uid or the unprivileged one our QEMUs run as
(:mod:`pytest_vmfork.host.confine`: the one recorded in the VM's handles, or
``vmfork-qemu``); a forged ``handles.json`` naming any other process is
reported and left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container

from filelock import FileLock, Timeout

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import confine, private, procid
from pytest_vmfork.net import leaseroot, subnets
from pytest_vmfork.net import leases as lz

#: Seconds a lock may be waited for; gc never blocks a live run for longer.
LOCK_TIMEOUT = 0.5
#: A run directory without owner.json is only judged after this many seconds
#: (a run creates the directory a moment before it writes its owner record).
NO_OWNER_GRACE_S = 300.0
#: Seconds to wait for a killed QEMU to exit.
KILL_WAIT_S = 5.0
#: Default time budget of :func:`gc_at_session_start`.
SESSION_START_BUDGET_S = 2.0

KEPT = "kept"
_NOT_RUNS = {KEPT, "leases"}  # the fallback lease root lives in the run root too
_TAP_RE = re.compile(rf"{subnets.TAP_PREFIX}[0-9a-f]{{12}}")
_BRIDGE_RE = re.compile(rf"{subnets.BRIDGE_PREFIX}[0-9a-f]{{8}}")
_SNAP_PARTIAL_RE = re.compile(r"\.(staging|trash)-([0-9A-Za-z_]+)-(\d+)")
_IMAGE_PARTIAL_RE = re.compile(r"\.(staging|old)-([0-9A-Za-z_]+)-(\d+)-[0-9a-f]+")
_CONSOLE_RE = re.compile(r"path=(/[^,\x00]*)/console\.log")
_NAME_RE = re.compile(r"-name\x00vmfork-([^,\x00]+)")


# --- the report ---------------------------------------------------------------


@dataclass(frozen=True)
class GcItem:
    """One thing gc removed (or would remove, or skipped): what, which, why."""

    kind: str  # vmm, vm-dir, run-dir, kept, subnet-lease, reclaim, bridge, run-leases, tap, ...
    name: str
    reason: str


@dataclass
class GcReport:
    """What :func:`collect` removed, would remove (``dry_run``) or skipped."""

    dry_run: bool = False
    removed: list[GcItem] = field(default_factory=list)
    skipped: list[GcItem] = field(default_factory=list)
    live_runs: list[str] = field(default_factory=list)  # left alone: their owner lives
    elapsed_s: float = 0.0

    def remove(self, kind: str, name: object, reason: str) -> None:
        self.removed.append(GcItem(kind, str(name), reason))

    def skip(self, kind: str, name: object, reason: str) -> None:
        self.skipped.append(GcItem(kind, str(name), reason))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.removed:
            out[item.kind] = out.get(item.kind, 0) + 1
        return out

    def summary(self) -> str:
        """One line: ``3 run-dir, 1 bridge`` (or ``nothing``)."""
        counts = self.counts()
        return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing"

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {i.kind} {i.name}: {i.reason}" for i in self.removed]
        lines += [f"skipped {i.kind} {i.name}: {i.reason}" for i in self.skipped]
        tail = f"vmfork gc: {verb} {self.summary()}"
        if self.skipped:
            tail += f"; skipped {len(self.skipped)}"
        if self.live_runs:
            tail += f"; {len(self.live_runs)} live run(s) left alone"
        lines.append(tail + f" ({self.elapsed_s * 1000:.0f} ms)")
        return "\n".join(lines)


class _OutOfTime(Exception):
    pass


# --- processes ----------------------------------------------------------------


_read_json = leaseroot.read_record  # None if missing, {} if unreadable: one reader for every record


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@dataclass
class _Qemu:
    pid: int
    start: int
    ppid: int
    name: str
    vm_dir: Path
    orphan: str | None = None  # why its owner is gone; None: alive owner


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _scan_qemus(roots: list[Path]) -> list[_Qemu]:
    """QEMU processes of ours (``-name vmfork-...``) whose VM directory is
    ``<root>/<run>/<vm>`` for one of ``roots``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" not in raw or b"vmfork-" not in raw:
            continue
        text = raw.decode("utf-8", "replace")
        m, n = _CONSOLE_RE.search(text), _NAME_RE.search(text)
        if not m or not n:
            continue
        vm_dir = Path(m.group(1))
        if not any(vm_dir.parent.parent in (r, r.resolve()) for r in roots):
            continue
        st = procid.proc_stat(pid)
        if st is None or st.state == "Z":
            continue
        found.append(_Qemu(pid, st.start, st.ppid, n.group(1), vm_dir))
    return found


def _judge_qemu(q: _Qemu) -> str | None:
    """Why this QEMU's owner is gone, or None while it lives."""
    handles = _read_json(q.vm_dir / "handles.json")
    if handles and handles.get("pid") == q.pid and handles.get("start_time") == q.start:
        why = procid.record_gone(handles.get("owner_pid"), handles.get("owner_start_time"),
                           handles.get("boot_id"), _mtime(q.vm_dir / "handles.json"))
        return None if why is None else f"owner {why}"
    # No handles yet (a template boot, or a fork being started): QEMU is spawned
    # directly by its owner, so its parent is the owner until it dies.
    if q.ppid <= 1:
        return "reparented to init: its owner died"
    parent = procid.proc_stat(q.ppid)
    if parent is None or parent.state == "Z":
        return f"its parent {q.ppid} is gone"
    try:
        pcmd = Path(f"/proc/{q.ppid}/cmdline").read_bytes()
    except OSError:
        return f"its parent {q.ppid} is gone"
    if b"python" not in pcmd and b"pytest" not in pcmd and b"vmfork" not in pcmd:
        return f"reparented to pid {q.ppid} (not a pytest-vmfork process): its owner died"
    return None


def _qemu_uids(recorded: object) -> set[int]:
    """The uids a QEMU of ours may run as: this one, the default QEMU user's, and
    the one its (trusted) handles recorded, never root unless we are root."""
    uids = {os.geteuid()}
    default = confine.default_uid()
    if default is not None:
        uids.add(default)
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        uids.add(recorded)
    return uids


def _qemu_of_ours(pid: int, start: int, name: object, qemu_uid: object = None) -> str | None:
    """None if ``pid`` is the QEMU we started for VM ``name``: the same start
    time, argv[0] ``qemu-system-*``, ``-name vmfork-<name>``, and running as this
    uid or our QEMU user's (:func:`_qemu_uids`); else why not. A forged
    handles.json cannot make gc kill anything else."""
    st = procid.proc_stat(pid)
    if st is None or st.start != start:
        return "it is not the process recorded (gone, or another start time)"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "it is gone"
    if not os.path.basename(argv[0]).startswith(b"qemu-system-"):
        return f"its argv[0] {argv[0][:64]!r} is not qemu-system-*"
    names = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == b"-name"]
    if not isinstance(name, str) or [n.split(b",")[0] for n in names] != [f"vmfork-{name}".encode()]:
        return f"its -name {names[:1]!r} is not vmfork-{name}"
    uids = _qemu_uids(qemu_uid)
    uid = next((line.split()[1:4] for line in status.splitlines() if line.startswith("Uid:")), None)
    if not uid or any(u not in {str(n) for n in uids} for u in uid):
        return f"it runs as uid {' '.join(uid or ['?'])}, not as {' or '.join(map(str, sorted(uids)))}"
    return None


def _kill(pid: int, start: int, name: str, qemu_uid: object = None) -> str | None:
    """SIGKILL ``pid`` if it is still our QEMU of VM ``name`` that started at
    ``start`` and wait for it to exit; None on success (or if it is gone), else
    why not."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None  # already gone
    except OSError as exc:
        return f"pidfd_open failed: {exc.strerror}"
    try:
        st = procid.proc_stat(pid)  # after pidfd_open: the pidfd pins this exact process
        if st is None or st.start != start:
            return None  # exited (and the PID maybe reused) since the scan
        foreign = _qemu_of_ours(pid, start, name, qemu_uid)
        if foreign is not None:
            return f"not a QEMU of ours: {foreign}"
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "not permitted to kill it"
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(KILL_WAIT_S * 1000)):
            return f"still running {KILL_WAIT_S:g}s after SIGKILL"
        return None
    finally:
        os.close(pidfd)


# --- the collector --------------------------------------------------------------


@dataclass
class _Gc:
    report: GcReport
    run_root: Path
    lease_root: Path
    cache_dir: Path | None
    dry_run: bool
    include_kept: bool
    orphan_links: bool
    link_names: Container[str] | None
    lock_timeout: float
    deadline: float | None
    qemus: list[_Qemu] = field(default_factory=list)
    live_lease_runs: set[str] = field(default_factory=set)
    lease_bridges: set[str] = field(default_factory=set)
    run_root_trusted: bool = True

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise _OutOfTime

    # --- VMM processes and run directories -----------------------------------

    def trust_run_root(self) -> None:
        """Handles are trusted only from a verified private run root."""
        if not self.run_root.exists():
            return
        try:
            private.private_dir(self.run_root, "run directory base", create=False)
        except private.PrivateDirError as exc:
            self.run_root_trusted = False
            self.report.skip("run-root", self.run_root, f"not trusted, nothing in it is acted on: {exc}")

    def kill_orphans(self) -> None:
        if not self.run_root_trusted:
            return
        self.qemus = _scan_qemus([self.run_root])
        for q in self.qemus:
            q.orphan = _judge_qemu(q)
            if q.orphan is None:
                continue
            name = f"pid {q.pid} ({q.name})"
            if self.dry_run:
                self.report.remove("vmm", name, q.orphan)
                continue
            why = _kill(q.pid, q.start, q.name, (_read_json(q.vm_dir / "handles.json") or {}).get("qemu_uid"))
            if why is None:
                self.report.remove("vmm", name, q.orphan)
            else:
                self.report.skip("vmm", name, f"{q.orphan}, but {why}")

    def _live_qemu_in(self, path: Path) -> _Qemu | None:
        return next((q for q in self.qemus if q.orphan is None and _under(q.vm_dir, path)), None)

    def _failed_kill_in(self, path: Path) -> bool:
        skipped = {i.name for i in self.report.skipped if i.kind == "vmm"}
        return any(f"pid {q.pid} ({q.name})" in skipped for q in self.qemus if _under(q.vm_dir, path))

    def _handles_owner(self, vm_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
        """(handles, why the VM's owner is gone) — why is None while it lives."""
        handles = _read_json(vm_dir / "handles.json")
        if handles is None:
            return None, None
        if not handles:
            return handles, "handles.json is unreadable"
        why = procid.record_gone(handles.get("owner_pid"), handles.get("owner_start_time"),
                           handles.get("boot_id"), _mtime(vm_dir / "handles.json"))
        return handles, why

    def _vmm_from_handles(self, vm_dir: Path, handles: dict[str, Any], why: str) -> bool:
        """Kill a VM's QEMU found through its handles (a process the /proc scan
        did not attribute); False if it could not be killed."""
        pid, start = handles.get("pid"), handles.get("start_time")
        if not isinstance(pid, int) or not isinstance(start, int):
            return True
        st = procid.proc_stat(pid)
        if st is None or st.state == "Z" or st.start != start:
            return True
        if any(q.pid == pid for q in self.qemus):
            return not self._failed_kill_in(vm_dir)
        name = f"pid {pid} ({handles.get('name', vm_dir.name)})"
        foreign = _qemu_of_ours(pid, start, handles.get("name"), handles.get("qemu_uid"))
        if foreign is not None:  # a stale or forged handle: that process is none of ours
            self.report.skip("vmm", name, f"handles.json names it, but it is not a QEMU of ours "
                                          f"({foreign}); left alone")
            return True
        if self.dry_run:
            self.report.remove("vmm", name, f"owner {why}")
            return True
        failed = _kill(pid, start, handles.get("name", vm_dir.name), handles.get("qemu_uid"))
        if failed is None:
            self.report.remove("vmm", name, f"owner {why}")
            return True
        self.report.skip("vmm", name, f"owner {why}, but {failed}")
        return False

    def _rmtree(self, kind: str, path: Path, reason: str) -> bool:
        if self.dry_run:
            self.report.remove(kind, path, reason)
            return True
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return True  # removed meanwhile (its owner finished)
        except OSError as exc:
            self.report.skip(kind, path, f"{reason}, but removing it failed: {exc.strerror}")
            return False
        self.report.remove(kind, path, reason)
        return True

    def runs(self) -> None:
        if not self.run_root_trusted or not self.run_root.is_dir():
            return
        for run_dir in sorted(self.run_root.iterdir()):
            self.check_time()
            if run_dir.name in _NOT_RUNS or not run_dir.is_dir() or run_dir.is_symlink():
                continue
            with contextlib.suppress(FileNotFoundError):
                self._run(run_dir)
        if self.include_kept:
            self.kept()

    def _run(self, run_dir: Path) -> None:
        owner_path = run_dir / "owner.json"
        owner = _read_json(owner_path)
        run_id = str(owner.get("run_id", run_dir.name)) if owner else run_dir.name
        if owner is None:
            age = time.time() - (_mtime(run_dir) or time.time())
            why = None if age < NO_OWNER_GRACE_S else f"no owner record, untouched for {age:.0f}s"
        elif not owner:
            why = "owner.json is unreadable"
        else:
            why = procid.record_gone(owner.get("pid"), owner.get("start_time"), owner.get("boot_id"),
                               _mtime(owner_path))
            why = None if why is None else f"owner {why}"
        if why is not None and run_id in self.live_lease_runs:
            why = None  # a worker of the run still holds its network lease
        vm_dirs = [p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()]
        live_vm = False
        removable = True
        for vm_dir in vm_dirs:
            handles, vm_why = self._handles_owner(vm_dir)
            live_q = self._live_qemu_in(vm_dir)
            if live_q is not None or (handles is not None and vm_why is None):
                live_vm = True  # a QEMU or a worker of this run still lives
                continue
            if handles is None:
                if why is None:
                    continue  # being set up by the live run (no handles yet)
                vm_why = why
            else:
                assert vm_why is not None
                vm_why = f"VM owner {vm_why}"
            if self._failed_kill_in(vm_dir) or (
                    handles and not self._vmm_from_handles(vm_dir, handles, vm_why)):
                removable = False
                continue
            if not self._rmtree("vm-dir", vm_dir, vm_why):
                removable = False
        if why is None or live_vm:
            if why is not None and live_vm:
                why = None
            self.report.live_runs.append(run_id)
            return
        if removable:
            self._rmtree("run-dir", run_dir, why)
        else:
            self.report.skip("run-dir", run_dir, f"{why}, but some of its VMs could not be removed")

    def kept(self) -> None:
        self.kept_snapshots()
        kept = self.run_root / KEPT
        if not kept.is_dir():
            return
        for path in sorted(kept.iterdir()):
            self.check_time()
            handles, why = self._handles_owner(path) if path.is_dir() else (None, None)
            if handles and why is None:
                self.report.skip("kept", path, "its VM's owner is still alive")
                continue
            if self._live_qemu_in(path) is not None:
                self.report.skip("kept", path, "a QEMU still runs in it")
                continue
            if path.is_dir() and not path.is_symlink():
                self._rmtree("kept", path, "kept VM files (--kept)")
            elif self.dry_run:
                self.report.remove("kept", path, "kept VM files (--kept)")
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self.report.remove("kept", path, "kept VM files (--kept)")

    def kept_snapshots(self) -> None:
        """The snapshots --vmfork-keep-failed saved in the cache (``vmfork kept``)."""
        if self.cache_dir is None:
            return
        from pytest_vmfork.vm.kept import list_kept

        for k in list_kept(self.cache_dir):
            self.check_time()
            self._rmtree("kept", k.dir, f"kept VM {k.name} of {k.test} (--kept)")

    # --- leases and links -----------------------------------------------------

    def read_leases(self) -> None:
        """Which runs hold a live lease, and which bridges leases name (no lock:
        lease files are replaced atomically)."""
        self.lease_bridges, self.live_lease_runs = lz.lease_summary(self.lease_root)

    def leases(self) -> None:
        host = leaseroot.host_lease_dir(self.lease_root)
        if not host.is_dir():
            return
        if self.dry_run:
            for stale in lz.stale_leases(self.lease_root, take=False):
                self.report.remove("subnet-lease", stale.subnet, f"run {stale.run_id}: {stale.reason}")
                self._delete_bridge(stale.bridge, f"its lease is stale ({stale.reason})")
            self._orphan_run_leases(remove=False)
            return
        try:
            with lz.host_lock(self.lease_root, self.lock_timeout):
                reclaimed = lz.stale_leases(self.lease_root, take=True)
        except VMForkError:
            self.report.skip("subnet-leases", host,
                             f"the host lease lock was busy for {self.lock_timeout:g}s")
            return
        done = []
        for stale in reclaimed:  # outside the host lock: deleting a bridge is slow
            self.report.remove("subnet-lease", stale.subnet, f"run {stale.run_id}: {stale.reason}")
            try:
                if self._delete_bridge(stale.bridge, f"its lease is stale ({stale.reason})"):
                    done.append(stale)
            except Exception as exc:  # the tombstone stays: the next gc or run finishes it
                self.report.skip("bridge", stale.bridge, f"deleting it failed: {exc}")
        try:
            with lz.host_lock(self.lease_root, self.lock_timeout):
                for stale in done:  # the bridges are gone: unblock the subnets
                    lz.finish_reclaim(stale)
                live = lz.live_run_ids(self.lease_root)  # under the lock: no run can join meanwhile
                for stale in done:
                    if stale.run_id not in live:
                        with contextlib.suppress(ConfigError):
                            if leaseroot.run_lease_dir(stale.run_id, self.lease_root).exists():
                                leaseroot.remove_run(stale.run_id, self.lease_root)
                                self.report.remove("run-leases", stale.run_id, "its subnet lease was stale")
                self._orphan_run_leases(remove=True, live=live)
        except VMForkError:
            self.report.skip("subnet-leases", host,
                             "the host lease lock was busy; the reclaim finishes on the next gc or run")

    def _orphan_run_leases(self, *, remove: bool, live: set[str] | None = None) -> None:
        """Per-run lease directories of runs without any lease whose fork
        entries all belong to dead processes."""
        runs = self.lease_root / "runs"
        if not runs.is_dir():
            return
        if live is None:
            live = lz.live_run_ids(self.lease_root)
        for path in sorted(runs.iterdir()):
            if path.name in live or not path.is_dir():
                continue
            alive = []
            for entry in path.glob("fork-*.json"):
                data = _read_json(entry)
                if data and procid.owner_gone(data.get("pid"), data.get("start_time"),
                                          data.get("boot_id")) is None:
                    alive.append(entry.name)
            if alive:
                self.report.skip("run-leases", path.name, f"no subnet lease, but live fork entries {alive}")
                continue
            if remove:
                shutil.rmtree(path, ignore_errors=True)
            self.report.remove("run-leases", path.name, "no subnet lease and no live fork")

    def _delete_bridge(self, name: str, reason: str) -> bool:
        from pytest_vmfork.net.network import delete_link

        kind = _links().get(name)
        if kind is None:
            return True  # already gone
        if kind != "bridge":
            self.report.skip("bridge", name, f"{reason}, but it is a {kind or 'non-bridge'} device")
            return False
        if self.dry_run or delete_link(name):
            self.report.remove("bridge", name, reason)
        return True

    def links(self) -> None:
        links = _links()
        wanted = {n: k for n, k in links.items()
                  if (self.link_names is None or n in self.link_names)
                  and ((k == "tun" and _TAP_RE.fullmatch(n)) or (k == "bridge" and _BRIDGE_RE.fullmatch(n)))}
        if not wanted:
            return
        indexes = {n: _ifindex(n) for n, k in wanted.items() if k == "tun"}
        holders = _tun_holders() if indexes else {}
        killed = {q.pid for q in self.qemus if q.orphan is not None}
        for name, kind in sorted(wanted.items()):
            self.check_time()
            if kind == "tun":
                held_by = holders.get(name, [])
                if any(p not in killed for p in held_by):
                    continue  # a live process holds it: it goes with that process
                if held_by:  # non-persistent: it goes with the QEMU killed above
                    if self.dry_run:
                        self.report.remove("tap", name, "it goes with its orphaned QEMU")
                    continue
                reason = "no process holds it (a persistent TAP nobody uses)"
                try:
                    # by the index seen before the holder scan: a TAP of that name made
                    # since (a new fork reusing the name) has another index and stays
                    if self.dry_run or _delete_link_index(indexes.get(name)):
                        self.report.remove("tap", name, reason)
                except Exception as exc:
                    self.report.skip("tap", name, f"{reason}, but deleting it failed: {exc}")
                continue
            if name in self.lease_bridges or name in self._reported("bridge"):
                continue  # a lease accounts for it (stale ones were handled above)
            ports = _bridge_ports(name)
            if not self.orphan_links:
                self.report.skip("bridge", name,
                                 f"no lease under {self.lease_root} names it (it may belong to a run with "
                                 "another lease dir); remove it with `vmfork gc --orphan-links`")
                continue
            if ports:
                self.report.skip("bridge", name, f"no lease names it, but ports {ports} are attached")
                continue
            try:
                self._delete_bridge(name,
                                    f"no lease under {self.lease_root} names it and no port is attached")
            except Exception as exc:
                self.report.skip("bridge", name, f"deleting it failed: {exc}")

    def _reported(self, kind: str) -> set[str]:
        return {i.name for i in self.report.removed + self.report.skipped if i.kind == kind}

    # --- partial builds -------------------------------------------------------

    def cache(self) -> None:
        if self.cache_dir is None:
            return
        for sub, pattern, kind in (("snapshots", _SNAP_PARTIAL_RE, "snapshot-partial"),
                                   ("images", _IMAGE_PARTIAL_RE, "image-partial"),
                                   ("roots", _IMAGE_PARTIAL_RE, "root-partial"),
                                   ("modules", _IMAGE_PARTIAL_RE, "modules-partial")):
            folder = self.cache_dir / sub
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(".*")):
                self.check_time()
                m = pattern.fullmatch(path.name)
                if not m or not path.is_dir():
                    continue
                what, key, pid = m.group(1), m.group(2), int(m.group(3))
                st = procid.proc_stat(pid)
                builder = "gone" if st is None else ("a zombie" if st.state == "Z" else None)
                lock_path = folder / f"{key}.lock"
                # A builder creates the key's lock file before its staging dir: without
                # one nobody builds the key (and a dry run creates no files).
                lock = FileLock(str(lock_path), timeout=0) if lock_path.exists() else None
                try:
                    if lock is not None:
                        lock.acquire()
                except Timeout:
                    self.report.skip(kind, path, f"a build of {key[:16]} holds its lock (builder pid {pid})")
                    continue
                except OSError as exc:
                    self.report.skip(kind, path, f"cannot open its lock: {exc.strerror}")
                    continue
                try:  # nobody builds this key now: the directory is not in use
                    reason = (f"{what} of a build whose builder pid {pid} is {builder}" if builder else
                              f"{what} of a finished build (pid {pid} holds no build lock: reused)")
                    self._rmtree(kind, path, reason)
                finally:
                    if lock is not None:
                        lock.release()


def _links() -> dict[str, str | None]:
    """Every interface: name -> kind ("bridge", "tun" or None), from sysfs
    (a netlink dump costs the pyroute2 import; deleting uses netlink)."""
    out: dict[str, str | None] = {}
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return out
    for name in names:
        base = f"/sys/class/net/{name}"
        out[name] = ("bridge" if os.path.isdir(f"{base}/bridge") else
                     "tun" if os.path.exists(f"{base}/tun_flags") else None)
    return out


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (OSError, ValueError):
        return None


def _delete_link_index(index: int | None) -> bool:
    """Delete the interface with this index; False if there is none."""
    if index is None:
        return False
    import errno

    from pytest_vmfork.net.netlink import iproute, netlink_code, off_loop

    def run() -> bool:
        with iproute() as ipr:
            try:
                ipr.link("del", index=index)
            except Exception as exc:
                if netlink_code(exc) == errno.ENODEV:
                    return False
                raise
        return True

    return off_loop(run)


def _bridge_ports(name: str) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/class/net/{name}/brif"))
    except OSError:
        return []


def _tun_holders() -> dict[str, list[int]]:
    """TAP name -> PIDs holding a /dev/net/tun fd attached to it (fdinfo ``iff:``)."""
    out: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "/dev/net/tun":
                    continue
                info = Path(f"/proc/{entry}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("iff:"):
                    out.setdefault(line.split(":", 1)[1].strip(), []).append(int(entry))
    return out


def collect(
    *,
    lease_root: Path | str | None = None,
    cache_dir: Path | str | None = None,
    run_root: Path | str | None = None,
    dry_run: bool = False,
    include_kept: bool = False,
    orphan_links: bool = False,
    link_names: Container[str] | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
    budget_s: float | None = None,
) -> GcReport:
    """Find what dead runs left on this host and remove it (``dry_run``: only list it).

    ``run_root`` (default :func:`pytest_vmfork.host.run.base_dir`), ``lease_root``
    (default :func:`pytest_vmfork.net.leases.default_lease_root`) and ``cache_dir``
    (default :func:`pytest_vmfork.config.default_cache_dir`) say where to look.
    TAPs nobody holds are host-wide (``link_names`` restricts which interfaces
    may be touched); bridges are removed when their lease is stale, and bridges
    no lease names only with ``orphan_links`` (their run may use another lease
    root). ``include_kept`` also removes ``<run root>/kept/``. ``budget_s``
    bounds the time spent; what is left is reported as skipped.
    """
    from pytest_vmfork.config import default_cache_dir
    from pytest_vmfork.host.run import base_dir

    t0 = time.monotonic()
    report = GcReport(dry_run=dry_run)
    gc = _Gc(
        report=report,
        run_root=Path(run_root) if run_root is not None else base_dir(),
        lease_root=Path(lease_root) if lease_root is not None else leaseroot.default_lease_root(),
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        dry_run=dry_run,
        include_kept=include_kept,
        orphan_links=orphan_links,
        link_names=link_names,
        lock_timeout=lock_timeout,
        deadline=None if budget_s is None else t0 + budget_s,
    )
    phases: list[tuple[str, Callable[[], None]]] = [
        ("run root", gc.trust_run_root),
        ("lease records", gc.read_leases),
        ("VMM processes", gc.kill_orphans),
        ("run directories", gc.runs),
        ("subnet leases", gc.leases),
        ("network links", gc.links),
        ("partial builds", gc.cache),
    ]
    for what, phase in phases:
        try:
            gc.check_time()
            phase()
        except _OutOfTime:
            report.skip("gc", what, f"time budget of {budget_s:g}s used up; run `vmfork gc`")
        except Exception as exc:  # one broken phase must not stop the others
            report.skip("gc", what, f"failed: {type(exc).__name__}: {exc}")
    report.elapsed_s = time.monotonic() - t0
    return report


def gc_at_session_start(
    *,
    lease_root: Path | str | None = None,
    cache_dir: Path | str | None = None,
    run_root: Path | str | None = None,
    budget_s: float = SESSION_START_BUDGET_S,
    progress: Callable[[str], None] | None = None,
    link_names: Container[str] | None = None,
) -> GcReport:
    """:func:`collect` for the start of a session: bounded by ``budget_s``,
    never raises, and silent unless it removed something (then one line
    through ``progress``)."""
    try:
        report = collect(lease_root=lease_root, cache_dir=cache_dir, run_root=run_root, link_names=link_names,
                         budget_s=budget_s, lock_timeout=min(LOCK_TIMEOUT, budget_s / 4))
    except Exception as exc:  # never break a session over cleanup
        report = GcReport()
        report.skip("gc", "collect", f"failed: {type(exc).__name__}: {exc}")
        return report
    if report.removed and progress is not None:
        names = ", ".join(f"{i.kind} {i.name}" for i in report.removed[:8])
        more = f" and {len(report.removed) - 8} more" if len(report.removed) > 8 else ""
        progress(f"vmfork: cleaned up after dead runs: {report.summary()}: {names}{more} "
                 f"({report.elapsed_s * 1000:.0f} ms; `vmfork gc --dry-run` lists leftovers)")
    return report


__all__ = ["GcItem", "GcReport", "collect", "gc_at_session_start"]
