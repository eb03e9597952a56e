"""Sweeps orphan QEMU processes: ours (``-name vmfork-<vm>``, console log in a VM
directory under the run root) whose owner is gone. PR_SET_PDEATHSIG normally takes a
QEMU with its owner; this catches one that outlived it anyway (setpriv could not set
it, an owner that died some other way), so its VM directory, TAP and memory go too.

A process is killed only if it is provably ours: the recorded start time, argv[0]
``qemu-system-*``, ``-name vmfork-<the VM's name>`` and this uid or our QEMU user's
(:mod:`pytest_vmfork.host.confine`); a forged ``handles.json`` naming any other
process is reported and left alone. Owners are judged by
:mod:`pytest_vmfork.host.procid` (PID *and* start time, boot id)."""

from __future__ import annotations

import os
import re
import select
import signal
from pathlib import Path
from typing import Any

from pytest_vmfork.host import confine, procid
from pytest_vmfork.janitor.sweep import Qemu, Sweep, mtime, read_json

#: Seconds to wait for a killed QEMU to exit.
KILL_WAIT_S = 5.0

_CONSOLE_RE = re.compile(r"path=(/[^,\x00]*)/console\.log")
_NAME_RE = re.compile(r"-name\x00vmfork-([^,\x00]+)")


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def scan(roots: list[Path]) -> list[Qemu]:
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
        found.append(Qemu(pid, st.start, st.ppid, n.group(1), vm_dir))
    return found


def judge(q: Qemu) -> str | None:
    """Why this QEMU's owner is gone, or None while it lives."""
    handles = read_json(q.vm_dir / "handles.json")
    if handles and handles.get("pid") == q.pid and handles.get("start_time") == q.start:
        why = procid.record_gone(handles.get("owner_pid"), handles.get("owner_start_time"),
                                 handles.get("boot_id"), mtime(q.vm_dir / "handles.json"))
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


def why_not_ours(pid: int, start: int, name: object, qemu_uid: object = None) -> str | None:
    """None if ``pid`` is the QEMU we started for VM ``name``: the same start
    time, argv[0] ``qemu-system-*``, ``-name vmfork-<name>``, and running as this
    uid or our QEMU user's; else why not. A forged handles.json cannot make gc
    kill anything else."""
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


def kill(pid: int, start: int, name: str, qemu_uid: object = None) -> str | None:
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
        foreign = why_not_ours(pid, start, name, qemu_uid)
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


# --- the phase and what later phases ask of it -------------------------------------------


def kill_orphans(sw: Sweep) -> None:
    """Find every QEMU of ours under the run root (into ``sw.qemus``) and kill
    those whose owner is gone."""
    if not sw.run_root_trusted:
        return
    sw.qemus = scan([sw.run_root])
    for q in sw.qemus:
        q.orphan = judge(q)
        if q.orphan is None:
            continue
        if sw.dry_run:
            sw.report.remove("vmm", q.label, q.orphan)
            continue
        why = kill(q.pid, q.start, q.name, (read_json(q.vm_dir / "handles.json") or {}).get("qemu_uid"))
        if why is None:
            sw.report.remove("vmm", q.label, q.orphan)
        else:
            sw.report.skip("vmm", q.label, f"{q.orphan}, but {why}")


def live_qemu_in(sw: Sweep, path: Path) -> Qemu | None:
    """A QEMU with a live owner whose VM directory is (under) ``path``."""
    return next((q for q in sw.qemus if q.orphan is None and _under(q.vm_dir, path)), None)


def failed_kill_in(sw: Sweep, path: Path) -> bool:
    """Whether an orphan QEMU under ``path`` could not be killed."""
    skipped = {i.name for i in sw.report.skipped if i.kind == "vmm"}
    return any(q.label in skipped for q in sw.qemus if _under(q.vm_dir, path))


def handles_owner(vm_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(handles, why the VM's owner is gone) — why is None while it lives."""
    handles = read_json(vm_dir / "handles.json")
    if handles is None:
        return None, None
    if not handles:
        return handles, "handles.json is unreadable"
    why = procid.record_gone(handles.get("owner_pid"), handles.get("owner_start_time"),
                             handles.get("boot_id"), mtime(vm_dir / "handles.json"))
    return handles, why


def kill_from_handles(sw: Sweep, vm_dir: Path, handles: dict[str, Any], why: str) -> bool:
    """Kill a VM's QEMU found through its handles (a process the /proc scan
    did not attribute); False if it could not be killed."""
    pid, start = handles.get("pid"), handles.get("start_time")
    if not isinstance(pid, int) or not isinstance(start, int):
        return True
    st = procid.proc_stat(pid)
    if st is None or st.state == "Z" or st.start != start:
        return True
    if any(q.pid == pid for q in sw.qemus):
        return not failed_kill_in(sw, vm_dir)
    name = f"pid {pid} ({handles.get('name', vm_dir.name)})"
    foreign = why_not_ours(pid, start, handles.get("name"), handles.get("qemu_uid"))
    if foreign is not None:  # a stale or forged handle: that process is none of ours
        sw.report.skip("vmm", name, f"handles.json names it, but it is not a QEMU of ours "
                                    f"({foreign}); left alone")
        return True
    if sw.dry_run:
        sw.report.remove("vmm", name, f"owner {why}")
        return True
    failed = kill(pid, start, handles.get("name", vm_dir.name), handles.get("qemu_uid"))
    if failed is None:
        sw.report.remove("vmm", name, f"owner {why}")
        return True
    sw.report.skip("vmm", name, f"owner {why}, but {failed}")
    return False
