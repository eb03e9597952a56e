"""Sweeps run directories (``<run root>/<run>/``, with ``owner.json``) and their VM
directories (``<run>/<vm>/``: sockets, console log, ``handles.json``) whose owner is
gone: a run killed without its teardown leaves them behind. A VM whose owner or QEMU
still lives keeps its whole run; a VM directory whose QEMU could not be killed keeps
its run directory. Nothing is read from a run root that is not verifiably private."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from pytest_vmfork.host import private, procid
from pytest_vmfork.janitor import processes
from pytest_vmfork.janitor.sweep import Sweep, mtime, read_json

#: A run directory without owner.json is only judged after this many seconds
#: (a run creates the directory a moment before it writes its owner record).
NO_OWNER_GRACE_S = 300.0
#: ``<run root>/kept/``: kept VMs (:mod:`pytest_vmfork.janitor.kept`), not a run.
KEPT = "kept"
_NOT_RUNS = {KEPT, "leases"}  # the fallback lease root lives in the run root too


def trust_run_root(sw: Sweep) -> None:
    """Handles are trusted only from a verified private run root."""
    if not sw.run_root.exists():
        return
    try:
        private.private_dir(sw.run_root, "run directory base", create=False)
    except private.PrivateDirError as exc:
        sw.run_root_trusted = False
        sw.report.skip("run-root", sw.run_root, f"not trusted, nothing in it is acted on: {exc}")


def sweep(sw: Sweep) -> None:
    """Remove every run directory (and VM directory) whose owner is gone."""
    if not sw.run_root_trusted or not sw.run_root.is_dir():
        return
    for run_dir in sorted(sw.run_root.iterdir()):
        sw.check_time()
        if run_dir.name in _NOT_RUNS or not run_dir.is_dir() or run_dir.is_symlink():
            continue
        with contextlib.suppress(FileNotFoundError):
            _run(sw, run_dir)


def _owner_gone(sw: Sweep, run_dir: Path) -> tuple[str, str | None]:
    """(run id, why its owner is gone); why is None while the run lives."""
    owner_path = run_dir / "owner.json"
    owner = read_json(owner_path)
    run_id = str(owner.get("run_id", run_dir.name)) if owner else run_dir.name
    if owner is None:
        age = time.time() - (mtime(run_dir) or time.time())
        why = None if age < NO_OWNER_GRACE_S else f"no owner record, untouched for {age:.0f}s"
    elif not owner:
        why = "owner.json is unreadable"
    else:
        why = procid.record_gone(owner.get("pid"), owner.get("start_time"), owner.get("boot_id"),
                                 mtime(owner_path))
        why = None if why is None else f"owner {why}"
    if why is not None and run_id in sw.live_lease_runs:
        why = None  # a worker of the run still holds its network lease
    return run_id, why


def _run(sw: Sweep, run_dir: Path) -> None:
    run_id, why = _owner_gone(sw, run_dir)
    vm_dirs = [p for p in run_dir.iterdir() if p.is_dir() and not p.is_symlink()]
    live_vm = False
    removable = True
    for vm_dir in vm_dirs:
        handles, vm_why = processes.handles_owner(vm_dir)
        live_q = processes.live_qemu_in(sw, vm_dir)
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
        if processes.failed_kill_in(sw, vm_dir) or (
                handles and not processes.kill_from_handles(sw, vm_dir, handles, vm_why)):
            removable = False
            continue
        if not sw.rmtree("vm-dir", vm_dir, vm_why):
            removable = False
    if why is None or live_vm:
        sw.report.live_runs.append(run_id)
        return
    if removable:
        sw.rmtree("run-dir", run_dir, why)
    else:
        sw.report.skip("run-dir", run_dir, f"{why}, but some of its VMs could not be removed")
