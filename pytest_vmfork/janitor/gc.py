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

:func:`collect` finds and removes them, one phase per module of this package
(``processes``, ``runs``, ``kept``, ``leases``, ``links``, ``partials``) over one
shared :class:`pytest_vmfork.janitor.sweep.Sweep`. Everything is judged by its owner's
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

import time
from pathlib import Path
from typing import Callable, Container

from pytest_vmfork.janitor import kept, leases, links, partials, processes, runs
from pytest_vmfork.janitor.report import GcItem, GcReport
from pytest_vmfork.janitor.sweep import OutOfTime, Sweep
from pytest_vmfork.net import leaseroot

#: Seconds a lock may be waited for; gc never blocks a live run for longer.
LOCK_TIMEOUT = 0.5
#: Default time budget of :func:`gc_at_session_start`.
SESSION_START_BUDGET_S = 2.0


def _run_dirs(sw: Sweep) -> None:
    if not sw.run_root_trusted or not sw.run_root.is_dir():
        return  # nothing of a missing or untrusted run root is acted on, kept VMs neither
    runs.sweep(sw)
    if sw.include_kept:  # <run root>/kept/ and kept snapshots only when asked
        kept.sweep(sw)


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
    sw = Sweep(
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
    # in this order: later phases spare what earlier ones found alive
    phases: list[tuple[str, Callable[[Sweep], None]]] = [
        ("run root", runs.trust_run_root),
        ("lease records", leases.read),
        ("VMM processes", processes.kill_orphans),
        ("run directories", _run_dirs),
        ("subnet leases", leases.sweep),
        ("network links", links.sweep),
        ("partial builds", partials.sweep),
    ]
    for what, phase in phases:
        try:
            sw.check_time()
            phase(sw)
        except OutOfTime:
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
