"""Per-run fork leases: each fork's address, MAC and TAP name on the run's subnet.

A run's subnet is leased host-wide (:mod:`pytest_vmfork.net.leases`), so the
names within it need only be agreed on by the run's own xdist workers: they
share ``<lease_root>/runs/<run_id>/`` (:mod:`pytest_vmfork.net.leaseroot`)
with one ``fork-<index>.json`` per live fork, written under the run's lock.
An entry whose owner died is reused by the next allocation.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Iterator

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import private
from pytest_vmfork.host.procid import boot_id, is_stale, process_start_time
from pytest_vmfork.net.leaseroot import (
    LOCK_TIMEOUT,
    LeaseLock,
    ensure_lease_dir,
    read_record,
    run_lease_dir,
    validate_run_id,
)
from pytest_vmfork.net.subnets import MAX_PREFIX, MIN_PREFIX, mac_for, tap_name


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

    def lock(self) -> LeaseLock:
        """The run's lock (also serialises "create the bridge if missing")."""
        ensure_lease_dir(self.dir)
        return LeaseLock(self.dir / ".lock", self.lock_timeout, f"run {self.run_id}")

    def lease_at(self, index: int, record: dict[str, Any], path: Path) -> ForkLease:
        """The fork lease of host ``index`` as ``record`` (a ``fork-<index>.json``)
        describes it: address, MAC and TAP name all follow from the index."""
        ip = self.subnet.network_address + index
        return ForkLease(
            index=index,
            ipv4=str(ip),
            prefix=self.subnet.prefixlen,
            gateway=self.gateway,
            mac=mac_for(ip),
            tap=tap_name(self.subnet, index),
            owner=str(record.get("owner", "?")),
            owner_pid=int(record.get("pid", 0)),
            owner_start_time=int(record.get("start_time", 0)),
            path=path,
        )

    def _entries(self) -> Iterator[tuple[int, Path, dict[str, Any] | None]]:
        for path in self.dir.glob("fork-*.json"):
            try:
                index = int(path.stem.removeprefix("fork-"))
            except ValueError:
                continue
            yield index, path, read_record(path)

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
            private.write_json(path, data)
            return self.lease_at(index, data, path)

    def release(self, lease: ForkLease) -> None:
        """Free ``lease``'s index (idempotent; never frees someone else's)."""
        with self.lock():
            data = read_record(lease.path)
            if data is not None and data.get("owner") == lease.owner and data.get("pid") == lease.owner_pid:
                lease.path.unlink(missing_ok=True)

    def leases(self) -> list[ForkLease]:
        """The current allocations, live or not (diagnostics)."""
        if not self.dir.is_dir():
            return []
        return sorted((self.lease_at(i, d, p) for i, p, d in self._entries() if d), key=lambda f: f.index)
