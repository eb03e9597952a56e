"""Host-wide subnet leases: which run owns which subnet, and thereby its bridge.

``<lease_root>/host/`` (:mod:`pytest_vmfork.net.leaseroot`) holds one
``subnet-<a>-<b>-<c>-<d>-<prefix>.json`` per leased subnet (a run's subnet
also names its bridge), written under ``host/.lock``. A lease names its
holders by PID *and* start time (field 22 of ``/proc/<pid>/stat``) so a
recycled PID is never mistaken for the owner. All xdist workers of a run
(same ``run_id``) share one lease: each joins it as a holder, and the lease is
stale only when *every* holder is gone, so one crashed worker cannot hand the
subnet to another run while its siblings still use the bridge.

Slow cleanup (deleting a dead run's bridge) never runs under the host lock:
under the lock a stale lease is only turned into a ``reclaim-….json``
tombstone owned by the reclaimer, which keeps the subnet blocked; the caller
deletes the bridge afterwards and calls :func:`finish_reclaim`. If the
reclaimer dies half-way, its tombstone is stale in turn and the next caller
redoes the cleanup. Runs (:func:`acquire_subnet`) and ``vmfork gc``
(:func:`stale_leases`) find stale leases and tombstones with the same single
pass over ``host/``, so they always agree on what is stale.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pytest_vmfork.errors import VMForkError
from pytest_vmfork.host import private
from pytest_vmfork.host.procid import boot_id, owner_gone, process_start_time
from pytest_vmfork.net.leaseroot import (
    LOCK_TIMEOUT,
    LeaseLock,
    ensure_lease_dir,
    host_lease_dir,
    read_record,
    validate_run_id,
)
from pytest_vmfork.net.subnets import as_pool, bridge_name, host_networks, is_bridge_name, subnet_stem

_SUBNET_FILE_RE = re.compile(r"(subnet|reclaim)-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)\.json")


@dataclass(frozen=True)
class StaleLease:
    """A subnet lease whose holders are all gone. Its tombstone keeps the
    subnet blocked until the caller has deleted ``bridge`` and called
    :func:`finish_reclaim`."""

    subnet: IPv4Network
    bridge: str
    run_id: str
    owner_pid: int | None
    reason: str
    tombstone: Path


@dataclass(frozen=True)
class SubnetLease:
    """A run's subnet (and thereby its bridge), as held by one process."""

    subnet: IPv4Network
    bridge: str
    run_id: str
    owner_pid: int  # the process that created the lease (first holder)
    owner_start_time: int
    created: float
    path: Path
    holder_pid: int  # the process this object belongs to; it must release it
    holder_start_time: int
    holder_token: str  # tells two holds by one process apart
    joined: bool = False  # True: another hold of the run (a sibling worker) leased it first
    reclaimed: tuple[StaleLease, ...] = field(default=())

    @property
    def prefix(self) -> int:
        return self.subnet.prefixlen

    @property
    def gateway(self) -> IPv4Address:
        """``.1``: the bridge's address, which the host uses to reach forks."""
        return self.subnet.network_address + 1


# --- the files of host/ -------------------------------------------------------


def lease_path(host: Path, subnet: IPv4Network) -> Path:
    """The lease file of ``subnet`` in the host lease directory ``host``."""
    return host / f"subnet-{subnet_stem(subnet)}.json"


def _holders(data: dict[str, Any]) -> list[dict[str, Any]]:
    holders = data.get("holders")
    if isinstance(holders, list) and holders:
        return [h for h in holders if isinstance(h, dict)]
    return [{"pid": data.get("owner_pid"), "start_time": data.get("owner_start_time")}]


def _lease_gone(data: dict[str, Any]) -> str | None:
    """None while any holder lives, else why the lease is stale."""
    if not data:
        return "lease file is unreadable"
    reasons = []
    for h in _holders(data):
        why = owner_gone(h.get("pid"), h.get("start_time"), data.get("boot_id"))
        if why is None:
            return None
        reasons.append(why)
    return "; ".join(reasons)


def _file_subnet(path: Path, data: dict[str, Any]) -> IPv4Network | None:
    try:
        return IPv4Network(data["subnet"])
    except (KeyError, TypeError, ValueError):
        m = _SUBNET_FILE_RE.fullmatch(path.name)
        if not m:
            return None
        try:
            return IPv4Network(".".join(m.group(2, 3, 4, 5)) + "/" + m.group(6))
        except ValueError:
            return None


def _safe_bridge(data: dict[str, Any], subnet: IPv4Network) -> str:
    """The recorded bridge if it looks like one of ours, never an arbitrary name."""
    name = data.get("bridge")
    return name if isinstance(name, str) and is_bridge_name(name) else bridge_name(subnet)


@dataclass(frozen=True)
class _Record:
    """One file of ``host/``: a lease, or a tombstone of a lease being cleaned up."""

    path: Path
    tombstone: bool
    data: dict[str, Any]  # {} when unreadable
    subnet: IPv4Network | None  # None: the file names no subnet

    @property
    def lease(self) -> dict[str, Any]:
        """The lease record: the file itself, or the copy a tombstone keeps."""
        if not self.tombstone:
            return self.data
        lease = self.data.get("lease")
        return lease if isinstance(lease, dict) else {}

    def gone(self) -> str | None:
        """None while its holders (a tombstone's: its reclaimer) live, else why not."""
        if not self.tombstone:
            return _lease_gone(self.data)
        d = self.data
        return owner_gone(d.get("reclaimer_pid"), d.get("reclaimer_start_time"), d.get("boot_id"))


def _records(host: Path) -> Iterator[_Record]:
    """Tombstones, then leases, each in name order; files removed meanwhile are
    skipped. Lazy: the leases are listed only after the tombstones were handled."""
    for pattern, tombstone in (("reclaim-*.json", True), ("subnet-*.json", False)):
        for path in sorted(host.glob(pattern)):
            data = read_record(path)
            if data is not None:
                yield _Record(path, tombstone, data, _file_subnet(path, data))


def write_tombstone(host: Path, subnet: IPv4Network, lease: dict[str, Any], reason: str,
                    reclaimer: tuple[int, int]) -> StaleLease:
    """Block ``subnet`` with a ``reclaim-….json`` tombstone in ``host`` owned by
    ``reclaimer`` (pid, start time) while ``lease``'s bridge is deleted; if the
    reclaimer dies first, the tombstone is stale and the next sweep redoes it."""
    path = host / f"reclaim-{subnet_stem(subnet)}.json"
    private.write_json(path, {"lease": lease, "subnet": str(subnet), "reason": reason,
                              "reclaimer_pid": reclaimer[0], "reclaimer_start_time": reclaimer[1],
                              "boot_id": boot_id()})
    pid = lease.get("owner_pid")
    return StaleLease(subnet, _safe_bridge(lease, subnet), str(lease.get("run_id", "?")),
                      pid if isinstance(pid, int) else None, reason, path)


@dataclass
class _Sweep:
    """What one pass over ``host/`` found."""

    stale: list[StaleLease] = field(default_factory=list)  # taken over, or only reported
    blocked: list[tuple[IPv4Network, str]] = field(default_factory=list)  # (subnet, why no run may take it)
    live: list[tuple[Path, dict[str, Any], IPv4Network]] = field(default_factory=list)  # live leases
    unnamed: list[Path] = field(default_factory=list)  # files naming no subnet


def _sweep(host: Path, reclaimer: tuple[int, int] | None) -> _Sweep:
    """The one pass that judges every tombstone and lease of ``host``.

    A lease is stale when all its holders are gone, a tombstone when its
    reclaimer died mid-cleanup. With a ``reclaimer`` (pid, start time; hold the
    host lock) each stale one is taken over: it becomes a tombstone owned by
    the reclaimer, which keeps its subnet blocked until :func:`finish_reclaim`.
    Without, stale ones are only reported (their ``tombstone`` is the file found).
    """
    out = _Sweep()
    for rec in _records(host):
        if rec.subnet is None:
            out.unnamed.append(rec.path)
            continue
        why = rec.gone()
        if why is None and not rec.tombstone:
            out.live.append((rec.path, rec.data, rec.subnet))
            continue
        if why is not None:
            reason = f"unfinished cleanup ({why})" if rec.tombstone else why
            lease = rec.lease
            if reclaimer is None:
                out.stale.append(StaleLease(rec.subnet, _safe_bridge(lease, rec.subnet),
                                            str(lease.get("run_id", "?")), None, reason, rec.path))
            else:
                out.stale.append(write_tombstone(host, rec.subnet, lease, reason, reclaimer))
                if not rec.tombstone:
                    rec.path.unlink(missing_ok=True)  # its tombstone stands in for it
        out.blocked.append((rec.subnet, "being cleaned up"))
    return out


# --- leasing ------------------------------------------------------------------


def _lock_at(host: Path, timeout: float) -> LeaseLock:
    return LeaseLock(host / ".lock", timeout, "host lease")


def host_lock(lease_root: Path | str | None = None, timeout: float = LOCK_TIMEOUT) -> LeaseLock:
    """The host-wide lease lock (VMForkError naming the holder's fix on timeout)."""
    return _lock_at(ensure_lease_dir(host_lease_dir(lease_root)), timeout)


def acquire_subnet(
    run_id: str,
    pool: Sequence[IPv4Network] | str,
    *,
    lease_root: Path | str | None = None,
    owner_pid: int | None = None,
    host_nets: Iterable[IPv4Network] | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> SubnetLease:
    """Lease the first free subnet of ``pool`` for ``run_id`` (or join the run's
    existing lease), reclaiming stale leases on the way.

    ``host_nets`` are the networks already routed on the host (default: read
    with netlink); subnets overlapping them are skipped. The returned lease's
    ``reclaimed`` lists stale leases turned into tombstones: the caller deletes
    their bridges *outside* the lock, then calls :func:`finish_reclaim`.
    """
    validate_run_id(run_id)
    subnets = as_pool(pool)
    pid = os.getpid() if owner_pid is None else owner_pid
    me = (pid, process_start_time(pid))
    holder = {"pid": me[0], "start_time": me[1], "token": secrets.token_hex(8)}
    # read before locking: a netlink dump is cheap, but the lock is host-wide
    occupied = list(host_networks() if host_nets is None else host_nets)
    host = ensure_lease_dir(host_lease_dir(lease_root))

    with _lock_at(host, lock_timeout):
        sweep = _sweep(host, me)
        for path in sweep.unnamed:
            path.unlink(missing_ok=True)  # blocks nothing, proves nothing
        mine = next((entry for entry in sweep.live if entry[1].get("run_id") == run_id), None)
        if mine is not None:  # another process of this run got here first: share
            path, data, subnet = mine
            holders = [h for h in _holders(data) if owner_gone(h.get("pid"), h.get("start_time")) is None]
            data["holders"] = [*holders, holder]
            private.write_json(path, data)
            return _lease_from(data, subnet, path, holder, joined=True, reclaimed=sweep.stale)

        blocked = sweep.blocked + [(subnet, f"run {data.get('run_id')} (pid {data.get('owner_pid')})")
                                   for _, data, subnet in sweep.live]
        overlaps = 0
        for subnet in subnets:
            if any(subnet.overlaps(b) for b, _ in blocked):
                continue
            if any(subnet.overlaps(n) for n in occupied):
                overlaps += 1
                continue
            data = {
                "subnet": str(subnet),
                "bridge": bridge_name(subnet),
                "run_id": run_id,
                "owner_pid": me[0],
                "owner_start_time": me[1],
                "created": time.time(),
                "boot_id": boot_id(),
                "holders": [holder],
            }
            path = lease_path(host, subnet)
            private.write_json(path, data)
            return _lease_from(data, subnet, path, holder, joined=False, reclaimed=sweep.stale)

    users = sorted({who for _, who in blocked})
    first, last = subnets[0], subnets[-1]
    raise VMForkError(
        f"no free /{first.prefixlen} subnet in the pool {first.network_address}..{last.broadcast_address} "
        f"({len(subnets)} subnets): {len(subnets) - overlaps} in use by other runs"
        + (f" ({', '.join(users[:5])}{', ...' if len(users) > 5 else ''})" if users else "")
        + f", {overlaps} overlap routes or addresses already on this host; wait for other runs "
        "to finish or configure a larger or different subnet pool"
    )


def _lease_from(data: dict[str, Any], subnet: IPv4Network, path: Path, holder: dict[str, Any], *,
                joined: bool, reclaimed: list[StaleLease]) -> SubnetLease:
    return SubnetLease(
        subnet=subnet,
        bridge=_safe_bridge(data, subnet),
        run_id=str(data["run_id"]),
        owner_pid=int(data.get("owner_pid", holder["pid"])),
        owner_start_time=int(data.get("owner_start_time", holder["start_time"])),
        created=float(data.get("created", 0.0)),
        path=path,
        holder_pid=holder["pid"],
        holder_start_time=holder["start_time"],
        holder_token=holder["token"],
        joined=joined,
        reclaimed=tuple(reclaimed),
    )


def finish_reclaim(stale: StaleLease) -> None:
    """The stale lease's bridge is gone: unblock its subnet."""
    stale.tombstone.unlink(missing_ok=True)


def release_subnet(
    lease: SubnetLease,
    *,
    teardown: Callable[[], None] | None = None,
    lock_timeout: float = LOCK_TIMEOUT,
) -> bool:
    """Drop this process's hold on ``lease``; True when it was the last holder
    and the lease is gone.

    When the last holder leaves, ``teardown`` (delete the bridge, ...) runs
    after the lock is released while a tombstone keeps the subnet blocked; if
    it raises, the tombstone stays and a later run finishes the cleanup.
    Safe to call twice.
    """
    host = lease.path.parent
    me = (lease.holder_pid, lease.holder_start_time, lease.holder_token)
    with _lock_at(host, lock_timeout):
        data = read_record(lease.path)
        if not data or data.get("run_id") != lease.run_id:
            return False  # already released, or reclaimed and re-leased by someone else
        others = [
            h for h in _holders(data)
            if (h.get("pid"), h.get("start_time"), h.get("token")) != me
            and owner_gone(h.get("pid"), h.get("start_time")) is None
        ]
        if others:
            data["holders"] = others
            private.write_json(lease.path, data)
            return False
        stale = write_tombstone(host, lease.subnet, data, "released", me[:2]) if teardown else None
        lease.path.unlink(missing_ok=True)
    if stale is not None and teardown is not None:
        teardown()
        finish_reclaim(stale)
    return True


# --- reading and reclaiming for diagnostics and cleanup tools (vmfork gc) ---------


def list_subnet_leases(lease_root: Path | str | None = None) -> list[dict[str, Any]]:
    """The raw host-wide lease records (for diagnostics and cleanup commands)."""
    host = host_lease_dir(lease_root)
    if not host.is_dir():
        return []
    return [{**rec.data, "path": str(rec.path), "stale": rec.gone()}
            for rec in _records(host) if not rec.tombstone and rec.data]


def lease_summary(lease_root: Path | str | None = None) -> tuple[set[str], set[str]]:
    """(bridges named by any lease or tombstone, run ids holding a live lease);
    read without the lock (lease files are replaced atomically)."""
    host = host_lease_dir(lease_root)
    bridges: set[str] = set()
    live: set[str] = set()
    if not host.is_dir():
        return bridges, live
    for rec in _records(host):
        if not rec.data:
            continue
        if rec.subnet is not None:
            bridges.add(_safe_bridge(rec.lease, rec.subnet))
        if not rec.tombstone and rec.gone() is None:
            live.add(str(rec.data.get("run_id")))
    return bridges, live


def stale_leases(lease_root: Path | str | None = None, *, take: bool) -> list[StaleLease]:
    """Stale subnet leases and abandoned tombstones. ``take`` (call it under
    :func:`host_lock`): turn them into tombstones owned by this process, as
    :func:`acquire_subnet` does, so no run can lease the subnets meanwhile; the
    caller deletes the bridges outside the lock, then calls :func:`finish_reclaim`."""
    me = (os.getpid(), process_start_time(os.getpid())) if take else None
    return _sweep(host_lease_dir(lease_root), me).stale


def live_run_ids(lease_root: Path | str | None = None) -> set[str]:
    """Runs with a live lease or a live reclaimer's tombstone (under
    :func:`host_lock` for an answer no run can change meanwhile)."""
    return {str(rec.lease.get("run_id")) for rec in _records(host_lease_dir(lease_root))
            if rec.data and rec.gone() is None}
