"""Leases: who owns which subnet, bridge, address, MAC and TAP name.

Bridge and TAP names and the IPv4 address space are kernel-global, so every
pytest-vmfork run on a host must agree on who owns what, and a run that died
(SIGKILL, OOM, power loss of the CI job) must not block the host forever.
Both problems are solved with small JSON lease files guarded by file locks:

``<lease_root>/host/``
    Host-wide. One ``subnet-<a>-<b>-<c>-<d>-<prefix>.json`` per leased subnet
    (a run's subnet also names its bridge), written under ``host/.lock``.
    A lease names its holders by PID *and* start time (field 22 of
    ``/proc/<pid>/stat``) so a recycled PID is never mistaken for the owner.
    All xdist workers of a run (same ``run_id``) share one lease: each joins
    it as a holder, and the lease is stale only when *every* holder is gone,
    so one crashed worker cannot hand the subnet to another run while its
    siblings still use the bridge.

``<lease_root>/runs/<run_id>/``
    Per-run. ``fork-<index>.json`` per live fork: its address, MAC and TAP
    name, shared by the xdist workers of the run and by nothing else.

Slow cleanup (deleting a dead run's bridge) never runs under the host lock:
under the lock a stale lease is only turned into a ``reclaim-….json``
tombstone owned by the reclaimer, which keeps the subnet blocked; the caller
deletes the bridge afterwards and calls :func:`finish_reclaim`. If the
reclaimer dies half-way, its tombstone is stale in turn and the next caller
redoes the cleanup.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from filelock import FileLock, Timeout

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import private
from pytest_vmfork.host.procid import boot_id, is_stale, owner_gone, process_start_time
from pytest_vmfork.net.netlink import iproute, off_loop

DEFAULT_POOL = "10.213.0.0/16"
DEFAULT_PREFIX = 24
MIN_PREFIX = 16  # keeps a fork index within the 4 hex digits of a TAP name
MAX_PREFIX = 29  # the smallest subnet that still holds a few forks
MAX_POOL_SUBNETS = 65536  # carving is eager; bound it
LOCK_TIMEOUT = 30.0
IFNAMSIZ = 15  # usable characters of a Linux interface name

BRIDGE_PREFIX = "vmfk"
TAP_PREFIX = "vt"
MAC_PREFIX = "52:54"  # 0x52: locally administered, unicast
RUN_LEASE_ROOT = Path("/run/vmfork")

_PRIVATE = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # all used with fullmatch
_BRIDGE_RE = re.compile(rf"{BRIDGE_PREFIX}[0-9a-f]{{8}}")
_SUBNET_FILE_RE = re.compile(r"(subnet|reclaim)-(\d+)-(\d+)-(\d+)-(\d+)-(\d+)\.json")


# --- locations ----------------------------------------------------------------


def default_lease_root() -> Path:
    """``/run/vmfork`` when this uid can use it (tmpfs: cleared by a reboot, shared
    by every run of root on the host), else ``leases/`` in this uid's private run
    directory base. Either way a verified private directory (pytest_vmfork.host.private).

    The fallback is only shared by one user's runs; bridges of other users are
    still avoided because their gateway addresses show up as host routes.
    """
    run = RUN_LEASE_ROOT
    try:
        run.mkdir(mode=private.PRIVATE_MODE, exist_ok=True)
        if os.access(run, os.W_OK | os.X_OK) and os.lstat(run).st_uid == os.geteuid():
            return private.private_dir(run, "lease root", create=False)
    except OSError:
        pass
    return private.private_dir(private.private_dir(private.run_base_dir(), "run directory base") / "leases",
                               "lease root")


def _root(lease_root: Path | str | None) -> Path:
    """The lease root, verified private (PrivateDirError names the fix otherwise)."""
    if lease_root is None:
        return default_lease_root()
    return private.private_dir(Path(lease_root), "lease root")


def _ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(mode=private.PRIVATE_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise VMForkError(
            f"cannot create lease directory {path}: {exc.strerror}; make it writable "
            "or point the lease root elsewhere"
        ) from exc
    return path


def host_lease_dir(lease_root: Path | str | None = None) -> Path:
    return _root(lease_root) / "host"


def validate_run_id(run_id: object) -> str:
    """Run ids name directories: keep them path-safe."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "not starting with . _ or -"
        )
    return run_id


def run_lease_dir(run_id: str, lease_root: Path | str | None = None) -> Path:
    """Where the per-run leases of ``run_id`` live (not created here)."""
    return _root(lease_root) / "runs" / validate_run_id(run_id)


def remove_run(run_id: str, lease_root: Path | str | None = None) -> None:
    """Remove a run's lease directory; missing is fine."""
    shutil.rmtree(run_lease_dir(run_id, lease_root), ignore_errors=True)


class _Locked:
    """A FileLock whose timeout is a VMForkError that says what to do."""

    def __init__(self, path: Path, timeout: float, what: str) -> None:
        self._lock = FileLock(str(path), timeout=timeout)
        self._path = path
        self._timeout = timeout
        self._what = what

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            raise VMForkError(
                f"timed out after {self._timeout:g} s waiting for the {self._what} lock "
                f"{self._path}: another pytest-vmfork process holds it; find it with "
                f"`fuser {self._path}` and wait for it or stop it"
            ) from None
        except OSError as exc:
            raise VMForkError(f"cannot open lock file {self._path}: {exc.strerror}") from exc

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic (a reader sees the old file or the whole new one), never through a symlink."""
    private.write_json(path, data)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: nobody can prove ownership
    return data if isinstance(data, dict) else {}


# --- names --------------------------------------------------------------------


def bridge_name(subnet: IPv4Network) -> str:
    """``vmfk`` + the network address in hex: 12 characters, unique per subnet,
    so leasing the subnet leases the name."""
    return f"{BRIDGE_PREFIX}{int(subnet.network_address):08x}"


def tap_name(subnet: IPv4Network, index: int) -> str:
    """``vt`` + network address + host index in hex: 14 characters."""
    return f"{TAP_PREFIX}{int(subnet.network_address):08x}{index:04x}"


def mac_for(address: IPv4Address | str) -> str:
    """``52:54`` + the four bytes of the IPv4 address: locally administered,
    unicast, and unique wherever the addresses are (subnets of concurrent runs
    never overlap)."""
    raw = IPv4Address(address).packed
    return MAC_PREFIX + "".join(f":{b:02x}" for b in raw)


def _subnet_stem(subnet: IPv4Network) -> str:
    return "-".join(str(subnet.network_address).split(".")) + f"-{subnet.prefixlen}"


# --- the pool -----------------------------------------------------------------


def parse_pool(text: str, prefix: int = DEFAULT_PREFIX) -> list[IPv4Network]:
    """Carve ``text`` (one or more comma-separated private IPv4 networks) into
    ``/prefix`` subnets, in order.

    Private (RFC 1918) only, because leased subnets become routes on the host:
    a public range would shadow real destinations.
    """
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not MIN_PREFIX <= prefix <= MAX_PREFIX:
        raise ConfigError(
            f"invalid subnet prefix {prefix!r}: use an integer from {MIN_PREFIX} to {MAX_PREFIX} "
            f"(/{MIN_PREFIX} is the largest run subnet, /{MAX_PREFIX} still holds 5 forks)"
        )
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(
            f"invalid subnet pool {text!r}: give private IPv4 networks in CIDR notation, "
            f"e.g. {DEFAULT_POOL} or 10.213.0.0/17,192.168.100.0/22"
        )
    entries: list[IPv4Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            raise ConfigError(
                f"invalid subnet pool {text!r}: empty entry; separate networks with single commas"
            )
        try:
            net = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            raise ConfigError(
                f"invalid subnet pool entry {item!r}: {exc}; use CIDR notation with the "
                f"network address, e.g. {DEFAULT_POOL}"
            ) from None
        if not isinstance(net, IPv4Network):
            raise ConfigError(f"invalid subnet pool entry {item!r}: not IPv4; use a private IPv4 network")
        if not any(net.subnet_of(p) for p in _PRIVATE):
            raise ConfigError(
                f"invalid subnet pool entry {item!r}: not a private network; use a range "
                "inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
            )
        if net.prefixlen > prefix:
            raise ConfigError(
                f"invalid subnet pool entry {item!r}: smaller than one /{prefix} run subnet; "
                f"use a /{prefix} or larger network, or a longer subnet prefix"
            )
        for other in entries:
            if net.overlaps(other):
                raise ConfigError(
                    f"invalid subnet pool {text!r}: {other} and {net} overlap; list each range once"
                )
        entries.append(net)
    total = sum(2 ** (prefix - net.prefixlen) for net in entries)
    if total > MAX_POOL_SUBNETS:
        raise ConfigError(
            f"subnet pool {text!r} yields {total} /{prefix} subnets, more than {MAX_POOL_SUBNETS}; "
            "use a smaller pool or a shorter subnet prefix"
        )
    return [sub for net in entries for sub in net.subnets(new_prefix=prefix)]


def host_networks() -> list[IPv4Network]:
    """Every IPv4 route destination (all tables, default routes excluded) and
    every address's network on the host: subnets a run must not take."""
    def read() -> list[IPv4Network]:
        nets: set[IPv4Network] = set()
        with iproute() as ipr:
            for route in ipr.get_routes(family=socket.AF_INET):
                dst, length = route.get("dst"), route["dst_len"]
                if dst and length:  # a default route overlaps everything: not a conflict
                    nets.add(IPv4Network(f"{dst}/{length}", strict=False))
            for addr in ipr.get_addr(family=socket.AF_INET):
                address, length = addr.get("address"), addr["prefixlen"]
                if address:
                    nets.add(IPv4Network(f"{address}/{length}", strict=False))
        return sorted(nets)

    return off_loop(read)


def as_pool(pool: Sequence[IPv4Network] | str) -> list[IPv4Network]:
    """A pool given as text (parsed with the default prefix) or as subnets."""
    if isinstance(pool, str):
        return parse_pool(pool)
    subnets = list(pool)
    if not subnets or not all(isinstance(n, IPv4Network) for n in subnets):
        raise ConfigError("subnet pool must be a pool string or a non-empty list of IPv4Network")
    return subnets


# --- host-wide subnet leases --------------------------------------------------


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
    return name if isinstance(name, str) and _BRIDGE_RE.fullmatch(name) else bridge_name(subnet)


def _tombstone(host: Path, subnet: IPv4Network, lease: dict[str, Any], reason: str,
               me: tuple[int, int]) -> StaleLease:
    path = host / f"reclaim-{_subnet_stem(subnet)}.json"
    _write_json(path, {"lease": lease, "subnet": str(subnet), "reason": reason,
                       "reclaimer_pid": me[0], "reclaimer_start_time": me[1], "boot_id": boot_id()})
    pid = lease.get("owner_pid")
    return StaleLease(subnet, _safe_bridge(lease, subnet), str(lease.get("run_id", "?")),
                      pid if isinstance(pid, int) else None, reason, path)


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
    host = _ensure_dir(host_lease_dir(lease_root))

    with _Locked(host / ".lock", lock_timeout, "host lease"):
        reclaimed: list[StaleLease] = []
        blocked: list[tuple[IPv4Network, str]] = []
        mine: tuple[Path, dict[str, Any], IPv4Network] | None = None

        for path in sorted(host.glob("reclaim-*.json")):
            data = _read_json(path)
            if data is None:
                continue
            subnet = _file_subnet(path, data)
            why = owner_gone(data.get("reclaimer_pid"), data.get("reclaimer_start_time"), data.get("boot_id"))
            if why is None and subnet is not None:
                blocked.append((subnet, "being cleaned up"))
            elif subnet is None:
                path.unlink(missing_ok=True)
            else:  # the reclaimer died mid-cleanup: take the cleanup over
                lease = data.get("lease") if isinstance(data.get("lease"), dict) else {}
                reclaimed.append(_tombstone(host, subnet, lease, f"unfinished cleanup ({why})", me))
                blocked.append((subnet, "being cleaned up"))

        for path in sorted(host.glob("subnet-*.json")):
            data = _read_json(path)
            if data is None:
                continue
            subnet = _file_subnet(path, data)
            if subnet is None:
                path.unlink(missing_ok=True)
                continue
            why = _lease_gone(data)
            if why is not None:
                reclaimed.append(_tombstone(host, subnet, data, why, me))
                path.unlink(missing_ok=True)
                blocked.append((subnet, "being cleaned up"))
            elif data.get("run_id") == run_id and mine is None:
                mine = (path, data, subnet)
            else:
                blocked.append((subnet, f"run {data.get('run_id')} (pid {data.get('owner_pid')})"))

        if mine is not None:  # another process of this run got here first: share
            path, data, subnet = mine
            holders = [h for h in _holders(data) if owner_gone(h.get("pid"), h.get("start_time")) is None]
            data["holders"] = [*holders, holder]
            _write_json(path, data)
            return _lease_from(data, subnet, path, holder, joined=True, reclaimed=reclaimed)

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
            path = host / f"subnet-{_subnet_stem(subnet)}.json"
            _write_json(path, data)
            return _lease_from(data, subnet, path, holder, joined=False, reclaimed=reclaimed)

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
    with _Locked(host / ".lock", lock_timeout, "host lease"):
        data = _read_json(lease.path)
        if not data or data.get("run_id") != lease.run_id:
            return False  # already released, or reclaimed and re-leased by someone else
        others = [
            h for h in _holders(data)
            if (h.get("pid"), h.get("start_time"), h.get("token")) != me
            and owner_gone(h.get("pid"), h.get("start_time")) is None
        ]
        if others:
            data["holders"] = others
            _write_json(lease.path, data)
            return False
        stale = _tombstone(host, lease.subnet, data, "released", me[:2]) if teardown else None
        lease.path.unlink(missing_ok=True)
    if stale is not None and teardown is not None:
        teardown()
        finish_reclaim(stale)
    return True


def list_subnet_leases(lease_root: Path | str | None = None) -> list[dict[str, Any]]:
    """The raw host-wide lease records (for diagnostics and cleanup commands)."""
    host = host_lease_dir(lease_root)
    out = []
    for path in sorted(host.glob("subnet-*.json")) if host.is_dir() else []:
        data = _read_json(path)
        if data:
            out.append({**data, "path": str(path), "stale": _lease_gone(data)})
    return out


# --- reclaim API for cleanup tools (vmfork gc) ---------------------------------


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record: None if missing, {} if unreadable (nobody can prove ownership)."""
    return _read_json(path)


def host_lock(lease_root: Path | str | None = None, timeout: float = LOCK_TIMEOUT) -> _Locked:
    """The host-wide lease lock (VMForkError naming the holder's fix on timeout)."""
    return _Locked(_ensure_dir(host_lease_dir(lease_root)) / ".lock", timeout, "host lease")


def lease_summary(lease_root: Path | str | None = None) -> tuple[set[str], set[str]]:
    """(bridges named by any lease or tombstone, run ids holding a live lease);
    read without the lock (lease files are replaced atomically)."""
    host = host_lease_dir(lease_root)
    bridges: set[str] = set()
    live: set[str] = set()
    if not host.is_dir():
        return bridges, live
    for path in host.glob("subnet-*.json"):
        data = _read_json(path)
        if not data:
            continue
        subnet = _file_subnet(path, data)
        if subnet is not None:
            bridges.add(_safe_bridge(data, subnet))
        if _lease_gone(data) is None:
            live.add(str(data.get("run_id")))
    for path in host.glob("reclaim-*.json"):
        data = _read_json(path)
        if not data:
            continue
        subnet = _file_subnet(path, data)
        lease = data.get("lease") if isinstance(data.get("lease"), dict) else {}
        if subnet is not None:
            bridges.add(_safe_bridge(lease, subnet))
    return bridges, live


def stale_leases(lease_root: Path | str | None = None, *, take: bool) -> list[StaleLease]:
    """Stale subnet leases and abandoned tombstones. ``take`` (call it under
    :func:`host_lock`): turn them into tombstones owned by this process, as
    :func:`acquire_subnet` does, so no run can lease the subnets meanwhile; the
    caller deletes the bridges outside the lock, then calls :func:`finish_reclaim`."""
    host = host_lease_dir(lease_root)
    me = (os.getpid(), process_start_time(os.getpid()))
    out: list[StaleLease] = []
    for path in sorted(host.glob("reclaim-*.json")):
        data = _read_json(path)
        if data is None:
            continue
        subnet = _file_subnet(path, data)
        why = owner_gone(data.get("reclaimer_pid"), data.get("reclaimer_start_time"), data.get("boot_id"))
        if why is None or subnet is None:
            continue
        lease = data.get("lease") if isinstance(data.get("lease"), dict) else {}
        reason = f"unfinished cleanup ({why})"
        if take:
            out.append(_tombstone(host, subnet, lease, reason, me))
        else:
            out.append(StaleLease(subnet, _safe_bridge(lease, subnet), str(lease.get("run_id", "?")), None,
                                  reason, path))
    for path in sorted(host.glob("subnet-*.json")):
        data = _read_json(path)
        if data is None:
            continue
        subnet = _file_subnet(path, data)
        if subnet is None:
            continue
        why = _lease_gone(data)
        if why is None:
            continue
        if take:
            out.append(_tombstone(host, subnet, data, why, me))
            path.unlink(missing_ok=True)
        else:
            out.append(StaleLease(subnet, _safe_bridge(data, subnet), str(data.get("run_id", "?")), None, why,
                                  path))
    return out


def live_run_ids(lease_root: Path | str | None = None) -> set[str]:
    """Runs with a live lease or a live reclaimer's tombstone (under
    :func:`host_lock` for an answer no run can change meanwhile)."""
    host = host_lease_dir(lease_root)
    live = set()
    for path in host.glob("subnet-*.json"):
        data = _read_json(path)
        if data and _lease_gone(data) is None:
            live.add(str(data.get("run_id")))
    for path in host.glob("reclaim-*.json"):
        data = _read_json(path)
        if data and owner_gone(data.get("reclaimer_pid"), data.get("reclaimer_start_time"),
                               data.get("boot_id")) is None:
            lease = data.get("lease") if isinstance(data.get("lease"), dict) else {}
            live.add(str(lease.get("run_id")))
    return live


# --- per-run fork leases ------------------------------------------------------


@dataclass(frozen=True)
class ForkLease:
    """One fork's place on the run's subnet."""

    index: int  # host number within the subnet; .1 is the gateway
    ipv4: str
    prefix: int
    gateway: str
    mac: str
    tap: str
    owner: str  # a VM name
    owner_pid: int
    owner_start_time: int
    path: Path


class RunLeases:
    """Per-fork addresses, MACs and TAP names within one run's subnet.

    Shared by the run's xdist workers through ``runs/<run_id>/`` and a lock in
    it; every other run has its own subnet, hence its own names.
    """

    def __init__(
        self,
        run_id: str,
        subnet: IPv4Network | str,
        lease_root: Path | str | None = None,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.run_id = validate_run_id(run_id)
        try:
            self.subnet = IPv4Network(subnet)
        except ValueError as exc:
            raise ConfigError(f"invalid run subnet {subnet!r}: {exc}; use e.g. 10.213.0.0/24") from None
        if not MIN_PREFIX <= self.subnet.prefixlen <= MAX_PREFIX:
            raise ConfigError(
                f"invalid run subnet {self.subnet}: use a prefix from /{MIN_PREFIX} to /{MAX_PREFIX}"
            )
        self.dir = run_lease_dir(run_id, lease_root)
        self.lock_timeout = lock_timeout

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def capacity(self) -> int:
        """Fork addresses: all but network, gateway and broadcast."""
        return self.subnet.num_addresses - 3

    def lock(self) -> _Locked:
        """The run's lock (also serialises "create the bridge if missing")."""
        _ensure_dir(self.dir)
        return _Locked(self.dir / ".lock", self.lock_timeout, f"run {self.run_id}")

    def _lease(self, index: int, data: dict[str, Any], path: Path) -> ForkLease:
        ip = self.subnet.network_address + index
        return ForkLease(
            index=index,
            ipv4=str(ip),
            prefix=self.subnet.prefixlen,
            gateway=self.gateway,
            mac=mac_for(ip),
            tap=tap_name(self.subnet, index),
            owner=str(data.get("owner", "?")),
            owner_pid=int(data.get("pid", 0)),
            owner_start_time=int(data.get("start_time", 0)),
            path=path,
        )

    def _entries(self) -> Iterator[tuple[int, Path, dict[str, Any] | None]]:
        for path in self.dir.glob("fork-*.json"):
            try:
                index = int(path.stem.removeprefix("fork-"))
            except ValueError:
                continue
            yield index, path, _read_json(path)

    def allocate(self, owner: str, *, owner_pid: int | None = None) -> ForkLease:
        """The lowest free host index from .2 up, reclaiming dead owners' entries.

        Release a lease only after its QEMU has exited: the next fork reuses the
        TAP name, which the kernel refuses while the old TAP is still open.
        """
        pid = os.getpid() if owner_pid is None else owner_pid
        start = process_start_time(pid)
        with self.lock():
            used: set[int] = set()
            for index, path, data in self._entries():
                if data is None:
                    continue
                if not data or is_stale(data.get("pid"), data.get("start_time"), data.get("boot_id")):
                    path.unlink(missing_ok=True)
                    continue
                used.add(index)
            last = self.subnet.num_addresses - 2  # broadcast is num_addresses - 1
            index = next((i for i in range(2, last + 1) if i not in used), None)
            if index is None:
                raise VMForkError(
                    f"run {self.run_id}: all {self.capacity} fork addresses of {self.subnet} are in use; "
                    f"run fewer forks at once or use a larger subnet (a shorter prefix than "
                    f"/{self.subnet.prefixlen}, e.g. /24 holds 253 forks)"
                )
            data = {"owner": owner, "pid": pid, "start_time": start, "boot_id": boot_id(),
                    "index": index, "created": time.time()}
            path = self.dir / f"fork-{index}.json"
            _write_json(path, data)
            return self._lease(index, data, path)

    def release(self, lease: ForkLease) -> None:
        """Free ``lease``'s index (idempotent; never frees someone else's)."""
        with self.lock():
            data = _read_json(lease.path)
            if data is not None and data.get("owner") == lease.owner and data.get("pid") == lease.owner_pid:
                lease.path.unlink(missing_ok=True)

    def leases(self) -> list[ForkLease]:
        """The current allocations, live or not (diagnostics)."""
        if not self.dir.is_dir():
            return []
        return sorted((self._lease(i, d, p) for i, p, d in self._entries() if d), key=lambda f: f.index)
