"""Lease logic without kernel objects: pools, staleness, subnet and fork allocation.

Host routes are injected through ``host_nets`` so nothing here depends on (or
touches) the machine's network; every lease lives under tmp_path.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from filelock import FileLock
from hypothesis import given
from hypothesis import strategies as st

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import procid
from pytest_vmfork.net import forkleases, leaseroot, leases, subnets

POOL = subnets.parse_pool("10.213.0.0/22")  # four /24s keeps exhaustion cheap to reach


@pytest.fixture
def live_child():
    """A live process other than us: a second holder/owner."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the PID no longer exists
    return proc.pid


def acquire(run_id: str, root: Path, **kw) -> leases.SubnetLease:
    kw.setdefault("host_nets", [])
    return leases.acquire_subnet(run_id, kw.pop("pool", POOL), lease_root=root, **kw)


def write_lease(root: Path, subnet: str, run_id: str, pid: int, start: int) -> Path:
    net = IPv4Network(subnet)
    host = root / "host"
    host.mkdir(parents=True, exist_ok=True)
    path = host / f"subnet-{str(net.network_address).replace('.', '-')}-{net.prefixlen}.json"
    path.write_text(json.dumps({
        "subnet": subnet, "bridge": subnets.bridge_name(net), "run_id": run_id,
        "owner_pid": pid, "owner_start_time": start, "created": time.time(),
    }))
    return path


# --- pool parsing ---------------------------------------------------------------


def test_default_pool_is_carved_into_24s_in_order():
    pool = subnets.parse_pool(subnets.DEFAULT_POOL)
    assert len(pool) == 256
    assert pool[0] == IPv4Network("10.213.0.0/24") and pool[-1] == IPv4Network("10.213.255.0/24")


def test_pool_accepts_a_comma_separated_list_and_other_prefixes():
    pool = subnets.parse_pool(" 10.213.0.0/23 , 192.168.100.0/24", prefix=25)
    assert [str(n) for n in pool] == [
        "10.213.0.0/25", "10.213.0.128/25", "10.213.1.0/25", "10.213.1.128/25",
        "192.168.100.0/25", "192.168.100.128/25",
    ]
    assert subnets.parse_pool("172.16.0.0/16", prefix=16) == [IPv4Network("172.16.0.0/16")]


@pytest.mark.parametrize(
    ("text", "prefix", "message"),
    [
        ("not-a-network", 24, r"invalid subnet pool entry 'not-a-network'.*CIDR notation"),
        ("10.213.0.1/16", 24, r"'10\.213\.0\.1/16'.*has host bits set.*network address"),
        ("fd00::/64", 24, r"'fd00::/64': not IPv4"),
        ("8.8.0.0/16", 24, r"'8\.8\.0\.0/16': not a private network; use a range inside 10\.0\.0\.0/8"),
        ("100.64.0.0/16", 24, r"not a private network"),
        ("10.0.0.0/28", 24, r"'10\.0\.0\.0/28': smaller than one /24 run subnet"),
        ("10.0.0.0/16,10.0.1.0/24", 24, r"10\.0\.0\.0/16 and 10\.0\.1\.0/24 overlap; list each range once"),
        ("10.0.0.0/16,,", 24, r"empty entry"),
        ("", 24, r"invalid subnet pool ''.*e\.g\. 10\.213\.0\.0/16"),
        ("10.213.0.0/16", 30, r"invalid subnet prefix 30: use an integer from 16 to 29"),
        ("10.213.0.0/16", 15, r"invalid subnet prefix 15"),
        ("10.213.0.0/16", True, r"invalid subnet prefix True"),
        ("10.0.0.0/8", 29, r"yields 2097152 /29 subnets, more than 65536"),
    ],
)
def test_bad_pools_are_config_errors_that_say_what_to_do(text, prefix, message):
    with pytest.raises(ConfigError, match=message) as info:
        subnets.parse_pool(text, prefix=prefix)
    assert isinstance(info.value, ValueError)


@given(
    base=st.sampled_from(["10.0.0.0", "10.213.0.0", "172.16.0.0", "192.168.0.0"]),
    size=st.integers(16, 24),
    extra=st.integers(0, 5),
)
def test_carving_covers_the_pool_with_disjoint_subnets(base, size, extra):
    prefix = min(size + extra, 29)
    pool = subnets.parse_pool(f"{base}/{size}", prefix=prefix)
    assert len(pool) == 2 ** (prefix - size)
    assert all(n.prefixlen == prefix and n.subnet_of(IPv4Network(f"{base}/{size}")) for n in pool)
    assert sorted(pool) == pool and len(set(pool)) == len(pool)
    assert not any(a.overlaps(b) for a, b in zip(pool, pool[1:]))


# --- names ----------------------------------------------------------------------


def test_names_fit_ifnamsiz_and_macs_are_local_unicast():
    for subnet in (IPv4Network("10.213.0.0/24"), IPv4Network("192.168.255.248/29"),
                   IPv4Network("172.31.0.0/16")):
        assert re.fullmatch(r"vmfk[0-9a-f]{8}", subnets.bridge_name(subnet))
        last = subnet.num_addresses - 2
        for index in (2, last):
            assert len(subnets.tap_name(subnet, index)) <= subnets.IFNAMSIZ
            mac = subnets.mac_for(subnet.network_address + index)
            first = int(mac.split(":")[0], 16)
            assert re.fullmatch(r"52:54(:[0-9a-f]{2}){4}", mac)
            assert first & 0b10 and not first & 0b01  # locally administered, unicast
    assert subnets.bridge_name(IPv4Network("10.213.1.0/24")) == "vmfk0ad50100"
    assert subnets.tap_name(IPv4Network("10.213.1.0/24"), 2) == "vt0ad501000002"
    assert subnets.mac_for("10.213.1.2") == "52:54:0a:d5:01:02"


def test_default_lease_root_prefers_run_and_falls_back_to_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(leaseroot, "RUN_LEASE_ROOT", tmp_path / "vmfork")
    assert leaseroot.default_lease_root() == tmp_path / "vmfork"
    monkeypatch.setattr(leaseroot, "RUN_LEASE_ROOT", Path("/proc/vmfork-not-writable"))
    fallback = leaseroot.default_lease_root()
    assert fallback.parts[-2:] == (f"vmfork-{os.getuid()}", "leases")


def test_run_ids_must_be_path_safe(tmp_path):
    for bad in ("", "../x", ".hidden", "a/b", "x" * 65, "run\n", None):
        with pytest.raises(ConfigError, match="invalid run id"):
            leaseroot.run_lease_dir(bad, tmp_path)
    assert leaseroot.run_lease_dir("abc123", tmp_path) == tmp_path / "runs" / "abc123"


# --- host-wide subnet leases ----------------------------------------------------


def test_lease_file_records_the_owner(tmp_path):
    lease = acquire("run1", tmp_path)
    assert lease.subnet == IPv4Network("10.213.0.0/24") and lease.bridge == "vmfk0ad50000"
    assert str(lease.gateway) == "10.213.0.1" and lease.prefix == 24
    assert lease.path == tmp_path / "host" / "subnet-10-213-0-0-24.json"
    data = json.loads(lease.path.read_text())
    assert {k: data[k] for k in ("subnet", "bridge", "run_id", "owner_pid", "owner_start_time")} == {
        "subnet": "10.213.0.0/24", "bridge": "vmfk0ad50000", "run_id": "run1",
        "owner_pid": os.getpid(), "owner_start_time": procid.process_start_time(os.getpid()),
    }
    assert data["created"] <= time.time()
    assert leases.release_subnet(lease) is True
    assert not lease.path.exists()
    assert leases.release_subnet(lease) is False  # twice is fine


def test_the_same_run_shares_one_subnet_until_its_last_holder_leaves(tmp_path, live_child):
    first = acquire("run1", tmp_path)
    second = acquire("run1", tmp_path, owner_pid=live_child.pid)  # another xdist worker
    assert second.subnet == first.subnet and second.bridge == first.bridge
    assert second.joined and not first.joined
    assert (second.owner_pid, second.holder_pid) == (os.getpid(), live_child.pid)
    other = acquire("run2", tmp_path)
    assert other.subnet != first.subnet

    torn: list[str] = []
    assert leases.release_subnet(first, teardown=lambda: torn.append("x")) is False  # child still holds it
    assert first.path.exists() and not torn
    assert acquire("run3", tmp_path).subnet not in (first.subnet, other.subnet)
    assert leases.release_subnet(second, teardown=lambda: torn.append("x")) is True
    assert torn == ["x"] and not first.path.exists()
    assert not list((tmp_path / "host").glob("reclaim-*"))


def test_two_holds_in_one_process_are_counted_separately(tmp_path):
    first, second = acquire("run1", tmp_path), acquire("run1", tmp_path)
    assert second.joined and first.holder_token != second.holder_token
    assert leases.release_subnet(first) is False and first.path.exists()
    assert leases.release_subnet(first) is False  # a second release of the same hold changes nothing
    assert leases.release_subnet(second) is True and not first.path.exists()


def test_a_run_whose_first_worker_died_keeps_its_subnet(tmp_path, live_child):
    first = acquire("run1", tmp_path, owner_pid=live_child.pid)
    acquire("run1", tmp_path)  # we join
    live_child.kill()
    live_child.wait()  # the lease's creator is gone, we still hold it
    assert acquire("run2", tmp_path).subnet != first.subnet
    again = acquire("run1", tmp_path)
    assert again.subnet == first.subnet and not again.reclaimed


def test_different_runs_get_different_subnets_concurrently(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.starmap(_acquire_in_child, [(f"run{i}", str(tmp_path)) for i in range(8)])
    assert len(set(got)) == 8


def _acquire_in_child(run_id: str, root: str) -> str:
    pool = subnets.parse_pool("10.213.0.0/20")
    return str(leases.acquire_subnet(run_id, pool, lease_root=root, host_nets=[]).subnet)


def test_subnets_overlapping_host_routes_are_skipped(tmp_path):
    busy = [IPv4Network("10.213.0.0/23"), IPv4Network("10.213.2.128/25")]
    lease = acquire("run1", tmp_path, host_nets=busy)
    assert lease.subnet == IPv4Network("10.213.3.0/24")


def test_exhaustion_names_the_cause_and_the_fix(tmp_path):
    with pytest.raises(VMForkError, match=r"no free /24 subnet.*4 overlap routes.*larger or different"):
        acquire("run1", tmp_path, host_nets=[IPv4Network("10.0.0.0/8")])
    for i in range(4):
        acquire(f"run{i}", tmp_path)
    with pytest.raises(VMForkError, match=r"4 in use by other runs \(run run0 .*\), 0 overlap"):
        acquire("late", tmp_path)


def test_leases_with_another_prefix_still_block_overlapping_subnets(tmp_path, live_child):
    start = procid.process_start_time(live_child.pid)
    write_lease(tmp_path, "10.213.0.0/23", "wide", live_child.pid, start)
    assert acquire("run1", tmp_path).subnet == IPv4Network("10.213.2.0/24")


def test_host_networks_reads_routes_without_default_routes():
    nets = subnets.host_networks()
    assert all(isinstance(n, IPv4Network) and n.prefixlen > 0 for n in nets)
    assert IPv4Network("127.0.0.0/8") in nets


# --- stale reclaim ----------------------------------------------------------------


def test_stale_leases_are_reclaimed_and_reported(tmp_path, live_child):
    gone = dead_pid()
    stale_path = write_lease(tmp_path, "10.213.0.0/24", "deadrun", gone, 1)
    reused_path = write_lease(tmp_path, "10.213.1.0/24", "reused", os.getpid(), 1)
    live_path = write_lease(tmp_path, "10.213.2.0/24", "liverun", live_child.pid,
                            procid.process_start_time(live_child.pid))
    (tmp_path / "runs" / "deadrun").mkdir(parents=True)

    lease = acquire("run1", tmp_path)
    got = {s.run_id: s for s in lease.reclaimed}
    assert set(got) == {"deadrun", "reused"}
    assert got["deadrun"].bridge == "vmfk0ad50000" and got["deadrun"].owner_pid == gone
    assert got["deadrun"].reason == f"pid {gone} does not exist"
    assert "was reused" in got["reused"].reason
    assert not stale_path.exists() and not reused_path.exists() and live_path.exists()
    # the tombstones keep both subnets blocked until the bridges are gone
    assert lease.subnet == IPv4Network("10.213.3.0/24")
    with pytest.raises(VMForkError, match="no free"):
        acquire("run2", tmp_path)
    for stale in lease.reclaimed:
        leases.finish_reclaim(stale)
    assert acquire("run2", tmp_path).subnet == IPv4Network("10.213.0.0/24")


def test_an_unfinished_cleanup_is_taken_over(tmp_path):
    write_lease(tmp_path, "10.213.0.0/24", "deadrun", dead_pid(), 1)
    first = acquire("run1", tmp_path, owner_pid=os.getpid())
    (tomb,) = first.reclaimed
    # the reclaimer "dies" before deleting the bridge
    data = json.loads(tomb.tombstone.read_text())
    data["reclaimer_pid"] = dead_pid()
    tomb.tombstone.write_text(json.dumps(data))
    second = acquire("run2", tmp_path)
    (again,) = second.reclaimed
    assert again.bridge == "vmfk0ad50000" and "unfinished cleanup" in again.reason
    assert second.subnet == IPv4Network("10.213.2.0/24")


def test_one_pass_reclaims_stale_leases_and_abandoned_tombstones_for_runs_and_gc_alike(tmp_path):
    """acquire_subnet (a run) and stale_leases (vmfork gc) judge host/ with the
    same single pass: both find a lease whose holders died and a tombstone
    whose reclaimer died, and both take them over as tombstones of their own."""
    gone = dead_pid()
    for root in (tmp_path / "run", tmp_path / "gc"):
        write_lease(root, "10.213.0.0/24", "deadrun", gone, 1)
        leases.write_tombstone(leaseroot.host_lease_dir(root), POOL[1],
                               {"run_id": "older", "subnet": str(POOL[1])}, "released", (gone, 1))
    expected = [(POOL[1], "older", f"unfinished cleanup (pid {gone} does not exist)"),
                (POOL[0], "deadrun", f"pid {gone} does not exist")]

    reported = leases.stale_leases(tmp_path / "gc", take=False)
    assert [(s.subnet, s.run_id, s.reason) for s in reported] == expected
    assert [s.tombstone.name for s in reported] == ["reclaim-10-213-1-0-24.json", "subnet-10-213-0-0-24.json"]
    assert reported[1].tombstone.exists()  # reporting changes nothing

    lease = acquire("run1", tmp_path / "run")
    with leases.host_lock(tmp_path / "gc"):
        taken = leases.stale_leases(tmp_path / "gc", take=True)
    for root, stale in ((tmp_path / "run", list(lease.reclaimed)), (tmp_path / "gc", taken)):
        assert [(s.subnet, s.run_id, s.reason) for s in stale] == expected
        host = leaseroot.host_lease_dir(root)
        assert sorted(p.name for p in host.glob("*.json")) == sorted(
            [*(["subnet-10-213-2-0-24.json"] if stale is not taken else []),
             "reclaim-10-213-0-0-24.json", "reclaim-10-213-1-0-24.json"])
        assert {json.loads(s.tombstone.read_text())["reclaimer_pid"] for s in stale} == {os.getpid()}
    assert lease.subnet == POOL[2]  # both reclaimed subnets stay blocked until finish_reclaim
    # taken over by a live reclaimer: no longer stale, still blocking
    assert leases.stale_leases(tmp_path / "gc", take=False) == []
    assert acquire("run2", tmp_path / "gc").subnet == POOL[2]


def test_a_held_host_lock_times_out_with_a_clear_error(tmp_path):
    (tmp_path / "host").mkdir()
    with FileLock(str(tmp_path / "host" / ".lock")):
        message = r"timed out after 0\.2 s waiting for the host lease lock .*fuser"
        with pytest.raises(VMForkError, match=message):
            acquire("run1", tmp_path, lock_timeout=0.2)


def test_unreadable_lease_files_are_reclaimed(tmp_path):
    (tmp_path / "host").mkdir()
    (tmp_path / "host" / "subnet-10-213-0-0-24.json").write_text("{not json")
    lease = acquire("run1", tmp_path)
    assert [s.subnet for s in lease.reclaimed] == [IPv4Network("10.213.0.0/24")]
    assert lease.reclaimed[0].bridge == "vmfk0ad50000"


# --- per-run fork leases -----------------------------------------------------------


def test_forks_get_distinct_addresses_macs_and_taps(tmp_path):
    run = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)
    forks = [run.allocate(f"vm{i}") for i in range(10)]
    assert [f.index for f in forks] == list(range(2, 12))
    assert [f.ipv4 for f in forks][:2] == ["10.213.7.2", "10.213.7.3"]
    assert {f.gateway for f in forks} == {"10.213.7.1"} and {f.prefix for f in forks} == {24}
    for attr in ("ipv4", "mac", "tap"):
        assert len({getattr(f, attr) for f in forks}) == 10
    assert all(len(f.tap) <= subnets.IFNAMSIZ for f in forks)
    data = json.loads((run.dir / "fork-2.json").read_text())
    assert (data["owner"], data["pid"]) == ("vm0", os.getpid())
    assert data["start_time"] == procid.process_start_time(os.getpid())


def test_released_indexes_are_reused_lowest_first(tmp_path):
    run = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)
    forks = [run.allocate(f"vm{i}") for i in range(4)]
    run.release(forks[1])
    run.release(forks[1])  # idempotent
    run.release(forks[2])
    assert run.allocate("again").index == forks[1].index
    assert run.allocate("again2").index == forks[2].index
    assert run.allocate("new").index == 6


def test_workers_of_a_run_share_the_allocation_and_runs_do_not_collide(tmp_path):
    a = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)
    b = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)  # another worker, same run
    other = forkleases.RunLeases("run2", "10.213.8.0/24", tmp_path)
    x, y, z = a.allocate("vm-a"), b.allocate("vm-b"), other.allocate("vm-c")
    assert x.index != y.index and z.index == x.index
    assert len({x.mac, y.mac, z.mac}) == 3 and len({x.tap, y.tap, z.tap}) == 3
    assert [f.owner for f in b.leases()] == ["vm-a", "vm-b"]


def test_dead_owners_fork_leases_are_reclaimed(tmp_path, live_child):
    run = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)
    lost = run.allocate("vm-lost", owner_pid=live_child.pid)
    keep = run.allocate("vm-keep")
    live_child.kill()
    live_child.wait()
    assert run.allocate("vm-new").index == lost.index
    assert keep.path.exists()


def test_fork_exhaustion_names_the_subnet_size_and_the_fix(tmp_path):
    run = forkleases.RunLeases("run1", "10.213.7.248/29", tmp_path)
    assert run.capacity == 5
    assert [run.allocate("vm").ipv4 for _ in range(5)][-1] == "10.213.7.254"
    message = r"all 5 fork addresses of 10\.213\.7\.248/29 are in use.*larger subnet"
    with pytest.raises(VMForkError, match=message):
        run.allocate("vm")


def test_remove_run_deletes_the_run_directory(tmp_path):
    run = forkleases.RunLeases("run1", "10.213.7.0/24", tmp_path)
    run.allocate("vm")
    assert leaseroot.run_lease_dir("run1", tmp_path).is_dir()
    leaseroot.remove_run("run1", tmp_path)
    leaseroot.remove_run("run1", tmp_path)
    assert not leaseroot.run_lease_dir("run1", tmp_path).exists()


def test_bad_run_subnets_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="invalid run subnet 'x'"):
        forkleases.RunLeases("run1", "x", tmp_path)
    with pytest.raises(ConfigError, match=r"prefix from /16 to /29"):
        forkleases.RunLeases("run1", "10.213.7.0/30", tmp_path)
