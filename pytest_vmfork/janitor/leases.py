"""Sweeps network leases of dead runs under the lease root: host-wide subnet leases
whose holders are all gone (with the bridge each names), half-finished reclaims whose
reclaimer died (tombstones), and per-run lease directories (``runs/<run>/``) of runs
without a lease whose fork entries all belong to dead processes. A stale lease blocks
its subnet for every later run until it is reclaimed. The lease records themselves
are read and changed only through :mod:`pytest_vmfork.net.leases`, under its host
lock taken with a short timeout."""

from __future__ import annotations

import contextlib
import shutil

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import procid
from pytest_vmfork.janitor import links
from pytest_vmfork.janitor.sweep import Sweep, read_json
from pytest_vmfork.net import leaseroot
from pytest_vmfork.net import leases as lz


def read(sw: Sweep) -> None:
    """Which runs hold a live lease, and which bridges leases name (no lock:
    lease files are replaced atomically); the run and link sweeps spare them."""
    sw.lease_bridges, sw.live_lease_runs = lz.lease_summary(sw.lease_root)


def sweep(sw: Sweep) -> None:
    """Reclaim stale subnet leases, delete their bridges, then unblock their subnets."""
    host = leaseroot.host_lease_dir(sw.lease_root)
    if not host.is_dir():
        return
    if sw.dry_run:
        for stale in lz.stale_leases(sw.lease_root, take=False):
            sw.report.remove("subnet-lease", stale.subnet, f"run {stale.run_id}: {stale.reason}")
            links.delete_bridge(sw, stale.bridge, f"its lease is stale ({stale.reason})")
        _orphan_run_leases(sw, remove=False)
        return
    try:
        with lz.host_lock(sw.lease_root, sw.lock_timeout):
            reclaimed = lz.stale_leases(sw.lease_root, take=True)
    except VMForkError:
        sw.report.skip("subnet-leases", host, f"the host lease lock was busy for {sw.lock_timeout:g}s")
        return
    done = []
    for stale in reclaimed:  # outside the host lock: deleting a bridge is slow
        sw.report.remove("subnet-lease", stale.subnet, f"run {stale.run_id}: {stale.reason}")
        try:
            if links.delete_bridge(sw, stale.bridge, f"its lease is stale ({stale.reason})"):
                done.append(stale)
        except Exception as exc:  # the tombstone stays: the next gc or run finishes it
            sw.report.skip("bridge", stale.bridge, f"deleting it failed: {exc}")
    try:
        with lz.host_lock(sw.lease_root, sw.lock_timeout):
            for stale in done:  # the bridges are gone: unblock the subnets
                lz.finish_reclaim(stale)
            live = lz.live_run_ids(sw.lease_root)  # under the lock: no run can join meanwhile
            for stale in done:
                if stale.run_id not in live:
                    with contextlib.suppress(ConfigError):
                        if leaseroot.run_lease_dir(stale.run_id, sw.lease_root).exists():
                            leaseroot.remove_run(stale.run_id, sw.lease_root)
                            sw.report.remove("run-leases", stale.run_id, "its subnet lease was stale")
            _orphan_run_leases(sw, remove=True, live=live)
    except VMForkError:
        sw.report.skip("subnet-leases", host,
                       "the host lease lock was busy; the reclaim finishes on the next gc or run")


def _orphan_run_leases(sw: Sweep, *, remove: bool, live: set[str] | None = None) -> None:
    """Per-run lease directories of runs without any lease whose fork
    entries all belong to dead processes."""
    runs = sw.lease_root / "runs"
    if not runs.is_dir():
        return
    if live is None:
        live = lz.live_run_ids(sw.lease_root)
    for path in sorted(runs.iterdir()):
        if path.name in live or not path.is_dir():
            continue
        alive = []
        for entry in path.glob("fork-*.json"):
            data = read_json(entry)
            if data and procid.owner_gone(data.get("pid"), data.get("start_time"),
                                          data.get("boot_id")) is None:
                alive.append(entry.name)
        if alive:
            sw.report.skip("run-leases", path.name, f"no subnet lease, but live fork entries {alive}")
            continue
        if remove:
            shutil.rmtree(path, ignore_errors=True)
        sw.report.remove("run-leases", path.name, "no subnet lease and no live fork")
