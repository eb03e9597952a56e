"""Fork networking across whole pytest runs: generated user suites run in
subprocesses (``-n 2``), real forks on real TAPs, checked from outside.

Every inner run gets a private lease root and a private /22 subnet pool
(one /22 per test in 10.216.0.0/19; tests/vm/test_network.py uses
10.216.32.0/22), so these tests never compete with the outer run's network
or with each other; the inner suites record what each fork had (address,
MAC, TAP, bridge, QEMU pid, when it was live) as JSON in a directory passed
through ``VMFK_OUT``. Traffic only goes to the inner runs' own forks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_address, ip_interface
from pathlib import Path
from typing import Iterator

import pytest
from pyroute2 import IPRoute

from pytest_vmfork.net import forkleases, leaseroot, leases, subnets
from pytest_vmfork.net import network as nw

from .suites import CONFTEST, finish

RUN_TIMEOUT = 180  # seconds for one inner pytest run
#: Hypothesis' terminal-summary hook imports all of hypothesis in every xdist worker
#: *after* the worker reported "finished": seconds under load, which makes the
#: teardown race of test_a_worker_slow_to_exit_... hit the other runs at random.
NO_SLOW_WORKER_EXIT = ("-p", "no:hypothesispytest")


#: Imported by the generated test modules (they live next to it).
NETKIT = r'''
"""Helpers of the generated suites: a guest echo server, host-side echo
clients with bounded retries, and a record of each fork's network identity."""
import json, os, socket, time
from pathlib import Path

from pyroute2 import IPRoute

OUT = Path(os.environ["VMFK_OUT"])
PORT = 7000
ECHO = """
import socket, sys
port, tag = int(sys.argv[1]), sys.argv[2].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(tag + b"|" + data, peer)
"""


def start_echo(vm):
    vm.exec(["sh", "-c", "cat > /tmp/echo.py"], input=ECHO).check()
    vm.exec(f"python3 /tmp/echo.py {PORT} {vm.name} >/dev/null 2>&1 &").check()


def udp_echo(vm, payload, within=30.0):
    """The guest's echo of payload, from this (host) process to vm.ip directly."""
    end = time.monotonic() + within
    last = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.connect((vm.ip, PORT))
        for _ in range(200):
            try:
                s.send(payload)
                reply = s.recv(65535)
                assert reply == vm.name.encode() + b"|" + payload, reply
                return reply
            except OSError as exc:
                last = exc
            if time.monotonic() > end:
                break
            time.sleep(0.1)
    raise AssertionError(f"no UDP echo from {vm.ip}:{PORT} within {within}s: {last!r}")


def identity(vm):
    """What the fork has on the network, read from the kernel and the guest."""
    tap = vm.tap
    bridge = os.path.basename(os.readlink(f"/sys/class/net/{tap}/master"))
    with IPRoute() as ipr:
        (addr,) = ipr.get_addr(index=ipr.link_lookup(ifname=bridge)[0], family=socket.AF_INET)
    guest_mac = vm.exec(["cat", "/sys/class/net/eth0/address"]).check().stdout.decode().strip()
    return {
        "name": vm.name, "ip": vm.ip, "mac": vm.mac, "guest_mac": guest_mac, "tap": tap,
        "bridge": bridge, "gateway": f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}",
        "pid": vm.pid, "run_id": vm.run.run_id, "handoff": vm.timings.get("handoff_path"),
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test_pid": os.getpid(),
    }


def save(record, live_from):
    """live_from..live_until: a span during which the fork certainly held its lease."""
    record = {**record, "live_from": live_from, "live_until": time.time()}
    path = OUT / f"{os.getpid()}-{record['name']}.json"
    path.write_text(json.dumps(record))


def check_echo_and_save(payload, *vms):
    """Each fork answers its own UDP echo; all of them are recorded as live
    together from before the first identity read to after the last echo."""
    live_from = time.time()
    records = [identity(vm) for vm in vms]
    for i, vm in enumerate(vms):
        start_echo(vm)
        udp_echo(vm, f"{payload}-{i}".encode())
    for record in records:
        save(record, live_from)
'''

#: Item 6: six tests, eight forks (two tests hold two forks at once).
SUITE_SIX = """
import pytest
from netkit import check_echo_and_save

@pytest.mark.parametrize("i", range(4))
def test_one_fork_answers(vm, i):
    check_echo_and_save(f"one-{i}", vm)

@pytest.mark.parametrize("i", range(2))
def test_two_forks_answer(vm_factory, i):
    check_echo_and_save(f"pair-{i}", vm_factory(), vm_factory())  # two forks live at once
"""

#: Item 7: each fork of this run stays live until a fork of the other run is
#: live too (marker files in VMFK_RENDEZVOUS), so the two runs provably overlap.
SUITE_RENDEZVOUS = """
import os, time
from pathlib import Path
import pytest
from netkit import identity, save, start_echo, udp_echo

HERE, OTHER = os.environ["VMFK_LABEL"], os.environ["VMFK_OTHER"]
RV = Path(os.environ["VMFK_RENDEZVOUS"])
DEADLINE = time.monotonic() + 90  # one budget for the whole run, not per test

@pytest.mark.parametrize("i", range(4))
def test_fork_answers_while_the_other_run_has_a_fork(vm, i):
    live_from = time.time()
    record = identity(vm)
    start_echo(vm)
    udp_echo(vm, f"{HERE}-{i}".encode())
    (RV / f"{HERE}-{vm.name}").touch()
    while not list(RV.glob(f"{OTHER}-*")):
        assert time.monotonic() < DEADLINE, "the other run never had a live fork"
        time.sleep(0.05)
    udp_echo(vm, f"{HERE}-{i}-again".encode())  # still answering after the overlap
    save(record, live_from)
"""

#: Item 8: one fork, recorded.
SUITE_ONE = """
from netkit import check_echo_and_save

def test_fork_answers(vm):
    check_echo_and_save("after-reclaim", vm)
"""

#: Item 9: runs that end in every ordinary way: passes, a failure, several forks
#: in one test, and a fork whose QEMU was SIGKILLed mid-test.
SUITE_ENDINGS = """
import os, signal, time
from netkit import check_echo_and_save

def test_passes(vm):
    check_echo_and_save("passes", vm)

def test_fails_after_using_the_network(vm):
    check_echo_and_save("fails", vm)
    assert False, "intended failure"

def test_three_forks(vm_factory):
    for i in range(3):
        check_echo_and_save(f"three-{i}", vm_factory())

def test_qemu_killed_mid_test(vm):
    check_echo_and_save("killed", vm)
    tap = vm.tap
    os.kill(vm.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/sys/class/net/{tap}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/sys/class/net/{tap}"), "the TAP outlived its QEMU"
"""


# --- harness ------------------------------------------------------------------------


@dataclass
class InnerRun:
    """One generated suite, ready to be run as its own pytest process (or several)."""

    dir: Path
    out: Path
    lease_root: Path
    pool: str
    tmpdirs: list[Path]

    def command(self, *extra: str, basetemp: Path | None = None) -> list[str]:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *NO_SLOW_WORKER_EXIT, "-q", "-rf",
               "--vmfork-network=tap", f"--vmfork-lease-dir={self.lease_root}",
               f"--vmfork-subnet-pool={self.pool}", *extra]
        if basetemp is not None:
            cmd.append(f"--basetemp={basetemp}")
        return cmd

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment, as for a pytest started by hand: nothing of the
        outer xdist worker (a run id inherited from it would merge the runs)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "VMFORK_NETWORK")) and k != "PYTHONPATH"}
        tmp = Path(tempfile.mkdtemp(prefix="vmfk-", dir="/tmp"))  # short: QEMU's socket paths
        self.tmpdirs.append(tmp)
        env.update(TMPDIR=str(tmp), VMFK_OUT=str(self.out), PYTHONDONTWRITEBYTECODE="1", **extra)
        return env

    def popen(self, *extra: str, basetemp: Path | None = None, **env: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(*extra, basetemp=basetemp), cwd=self.dir, env=self.env(**env),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    def run(self, *extra: str, **env: str) -> tuple[int, str]:
        """Run the suite to the end (bounded): (exit status, output)."""
        return finish(self.popen(*extra, **env), RUN_TIMEOUT)

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob("*.json"))]


@pytest.fixture
def inner(tmp_path: Path, vmfork_snapshot) -> Iterator:
    """Makes generated suites. Depending on vmfork_snapshot makes the cached
    snapshot exist before an inner run looks for it."""
    made: list[InnerRun] = []

    def make(test_source: str, name: str = "net", pool_index: int = 0, conftest_extra: str = "") -> InnerRun:
        root = tmp_path / f"suite-{len(made)}"
        (root / "out").mkdir(parents=True)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "conftest.py").write_text(CONFTEST + textwrap.dedent(conftest_extra))
        (root / "netkit.py").write_text(NETKIT)
        (root / f"test_{name}.py").write_text(textwrap.dedent(test_source))
        run = InnerRun(root, root / "out", tmp_path / "leases", f"10.216.{pool_index * 4}.0/22", [])
        made.append(run)
        return run

    yield make
    for run in made:
        for tmp in run.tmpdirs:
            shutil.rmtree(tmp, ignore_errors=True)
    # Bridges a run leaked (the test has reported it): only this test's inner
    # runs use its pool, and a leak must not starve the next run of subnets.
    ours = {subnets.bridge_name(s) for run in made for s in subnets.parse_pool(run.pool)}
    for name in sorted(set(links()) & ours):
        nw.delete_link(name)


def links() -> dict[str, str | None]:
    """Every interface on the host: name -> kind."""
    with IPRoute() as ipr:
        return {m.get("IFLA_IFNAME"): (m.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_KIND")
                for m in ipr.get_links()}


def qemu_processes_under(paths: list[Path]) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmd and any(str(p) in cmd for p in paths):
            found.append(f"{pid}: {cmd[:160]}")
    return found


def lease_files(lease_root: Path) -> list[str]:
    host = leaseroot.host_lease_dir(lease_root)
    runs = lease_root / "runs"
    return sorted(
        [p.name for p in host.glob("*.json")] if host.is_dir() else []
    ) + sorted([f"runs/{p.name}" for p in runs.iterdir()] if runs.is_dir() else [])


def assert_nothing_left(runs: list[InnerRun], records: list[dict], *, keep: tuple[str, ...] = ()) -> None:
    """No TAP, bridge, lease file or QEMU of the inner runs remains (``keep``:
    bridges and lease files the test made itself and expects to survive)."""
    now = links()
    for r in records:
        assert r["tap"] not in now, f"TAP {r['tap']} of {r['name']} outlived its run"
        assert r["bridge"] not in now, f"bridge {r['bridge']} outlived its run"
    pool = [s for run in runs for s in subnets.parse_pool(run.pool)]
    bridges = sorted(set(now) & {subnets.bridge_name(s) for s in pool} - set(keep))
    assert bridges == [], f"bridges of the inner runs outlived them: {bridges}"
    # any TAP on these subnets, including warm-pool forks no test ever saw
    taps = sorted(n for n in now if n.startswith(tuple(subnets.tap_name(s, 0)[:-4] for s in pool)))
    assert taps == [], f"TAPs of the inner runs outlived them: {taps}"
    for run in {run.lease_root: run for run in runs}.values():
        left = [f for f in lease_files(run.lease_root) if f not in keep]
        assert left == [], f"lease files left in {run.lease_root}: {left}"
    assert qemu_processes_under([t for run in runs for t in run.tmpdirs]) == []
    for r in records:
        assert not os.path.exists(f"/proc/{r['pid']}") or b"qemu" not in Path(
            f"/proc/{r['pid']}/cmdline").read_bytes(), f"QEMU {r['pid']} of {r['name']} still runs"


def overlaps(a: dict, b: dict) -> bool:
    return a["live_from"] < b["live_until"] and b["live_from"] < a["live_until"]


# --- tests --------------------------------------------------------------------------


def test_every_fork_of_a_parallel_suite_has_its_own_address_and_answers(inner):
    suite = inner(SUITE_SIX, pool_index=0)
    code, out = suite.run("-n", "2")
    assert code == 0, out[-5000:]
    assert "6 passed" in out, out[-3000:]
    recs = suite.records()
    assert len(recs) == 8
    assert {r["worker"] for r in recs} == {"gw0", "gw1"}, "both workers should have forked"
    assert len({r["run_id"] for r in recs}) == 1 and len({r["bridge"] for r in recs}) == 1
    assert len({r["gateway"] for r in recs}) == 1
    subnet = ip_interface(recs[0]["gateway"]).network
    assert subnet.subnet_of(IPv4Network(suite.pool))
    for r in recs:
        assert ip_address(r["ip"]) in subnet and r["ip"] != str(ip_interface(r["gateway"]).ip)
        assert r["guest_mac"] == r["mac"].lower(), f"{r['name']}: guest eth0 has {r['guest_mac']}"
    # An address, MAC and TAP name is one identity: freed ones are reused by later forks.
    assert len({(r["ip"], r["mac"], r["tap"]) for r in recs}) == len({r["ip"] for r in recs}) \
        == len({r["mac"] for r in recs}) == len({r["tap"] for r in recs})
    # Forks live at the same time (within a test, and across the two workers) never share one.
    pairs = [(a, b) for a, b in itertools.combinations(recs, 2) if overlaps(a, b)]
    assert len(pairs) >= 2, "no forks were live at the same time; the check below would prove nothing"
    for a, b in pairs:
        assert a["ip"] != b["ip"] and a["mac"] != b["mac"] and a["tap"] != b["tap"], (a, b)
    assert_nothing_left([suite], recs)


def test_two_simultaneous_runs_never_share_an_address_tap_or_bridge(inner, tmp_path):
    suite = inner(SUITE_RENDEZVOUS, pool_index=1)
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    procs = {
        label: suite.popen("-n", "2", basetemp=tmp_path / f"basetemp-{label}", VMFK_LABEL=label,
                           VMFK_OTHER=other, VMFK_RENDEZVOUS=str(rendezvous))
        for label, other in (("A", "B"), ("B", "A"))
    }
    results = {label: finish(proc, RUN_TIMEOUT) for label, proc in procs.items()}
    for label, (code, out) in results.items():
        assert code == 0 and "4 passed" in out, f"run {label}:\n{out[-5000:]}"
    recs = suite.records()
    assert len(recs) == 8
    by_run: dict[str, list[dict]] = {}
    for r in recs:
        by_run.setdefault(r["run_id"], []).append(r)
    assert len(by_run) == 2, f"expected two runs, got run ids {sorted(by_run)}"
    first, second = by_run.values()
    assert any(overlaps(a, b) for a in first for b in second), "the two runs never had forks live together"
    for key in ("ip", "mac", "tap", "bridge", "gateway"):
        mine, theirs = {r[key] for r in first}, {r[key] for r in second}
        assert not mine & theirs, f"two runs shared {key}: {sorted(mine & theirs)}"
    for group in (first, second):
        assert len({r["bridge"] for r in group}) == 1  # one bridge per run, shared by its workers
        subnet = ip_interface(group[0]["gateway"]).network
        assert all(ip_address(r["ip"]) in subnet for r in group)
    nets = [ip_interface(g[0]["gateway"]).network for g in (first, second)]
    assert not nets[0].overlaps(nets[1])
    assert_nothing_left([suite], recs)


@contextlib.contextmanager
def dead_run(lease_root: Path, pool: str) -> Iterator[leases.SubnetLease]:
    """What a SIGKILLed run leaves: its subnet lease, a fork lease and its bridge,
    all real, owned by a process that is gone (reaped). Removed afterwards if
    the test did not see it reclaimed."""
    child = subprocess.Popen(["sleep", "60"])
    stale = None
    try:
        stale = leases.acquire_subnet("deadrun", subnets.parse_pool(pool), lease_root=lease_root,
                                  owner_pid=child.pid, host_nets=[])
        nw.ensure_bridge(stale.bridge, stale.subnet)
        forkleases.RunLeases("deadrun", stale.subnet, lease_root).allocate("f-dead", owner_pid=child.pid)
        child.kill()
        child.wait()  # reaped: the owner's PID is gone for good
        assert stale.path.exists() and (lease_root / "runs" / "deadrun").is_dir()
        assert links().get(stale.bridge) == "bridge"
        yield stale
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if stale is not None:
            nw.delete_link(stale.bridge)
            stale.path.unlink(missing_ok=True)
            for tomb in leaseroot.host_lease_dir(lease_root).glob("reclaim-*.json"):
                tomb.unlink()
        leaseroot.remove_run("deadrun", lease_root)


@contextlib.contextmanager
def live_run(lease_root: Path, pool: str) -> Iterator[leases.SubnetLease]:
    """A run that is alive (this very process): its lease and its bridge."""
    live = leases.acquire_subnet("liverun", subnets.parse_pool(pool), lease_root=lease_root, host_nets=[])
    try:
        nw.ensure_bridge(live.bridge, live.subnet)
        yield live
    finally:
        leases.release_subnet(live)
        nw.delete_link(live.bridge)


def test_a_dead_runs_lease_is_reclaimed_and_a_live_runs_lease_is_kept(inner):
    suite = inner(SUITE_ONE, pool_index=2)
    # The live lease first: taken after the dead one, its acquire_subnet would reclaim that itself.
    with live_run(suite.lease_root, suite.pool) as live, dead_run(suite.lease_root, suite.pool) as stale:
        assert live.subnet != stale.subnet
        code, out = suite.run("-n", "2")
        assert code == 0 and "1 passed" in out, out[-5000:]
        (rec,) = suite.records()
        assert rec["bridge"] != live.bridge  # the dead run's subnet may be reused once reclaimed

        now = links()
        assert stale.bridge not in now, f"the dead run's bridge {stale.bridge} was not reclaimed"
        assert not stale.path.exists(), "the dead run's lease file is still there"
        assert not (suite.lease_root / "runs" / "deadrun").exists(), "the dead run's fork leases remain"
        assert now.get(live.bridge) == "bridge", "a live run's bridge was deleted"
        (kept,) = leases.list_subnet_leases(suite.lease_root)
        assert (kept["run_id"], kept["stale"]) == ("liverun", None)
        assert_nothing_left([suite], [rec], keep=(live.bridge, live.path.name))
    assert not {stale.bridge, live.bridge} & set(links())
    assert lease_files(suite.lease_root) == []


def test_reclaiming_a_dead_runs_lease_is_reported_on_the_terminal(inner):
    suite = inner(SUITE_ONE, pool_index=4)
    with dead_run(suite.lease_root, suite.pool) as stale:
        code, out = suite.run()  # one process: only the controller reports progress
        assert code == 0 and "1 passed" in out, out[-5000:]
        assert stale.bridge not in links()  # it was reclaimed, and said so:
        # gc at session start (or the network's own reclaim) removes it and says so
        assert (f"vmfork: reclaimed stale network lease {stale.subnet} of run deadrun" in out
                or ("vmfork: cleaned up after dead runs" in out and stale.bridge in out)), out[-3000:]
    assert lease_files(suite.lease_root) == []


#: Item 9 again: one fork on each worker, and a reporting hook that takes a while
#: in the workers, as hypothesis' plugin does when it imports itself at the end
#: of every worker under load (or a coverage/report plugin would).
SUITE_ONE_PER_WORKER = """
import pytest
from netkit import check_echo_and_save

@pytest.mark.parametrize("i", range(2))
def test_fork_answers(vm, i):
    check_echo_and_save(f"slow-exit-{i}", vm)
"""

SLOW_WORKER_SUMMARY = """
import time

def pytest_terminal_summary(terminalreporter, config):
    if hasattr(config, "workerinput"):
        time.sleep(8)
"""


def test_a_worker_slow_to_exit_still_removes_the_run_bridge_and_lease(inner):
    suite = inner(SUITE_ONE_PER_WORKER, pool_index=5, conftest_extra=SLOW_WORKER_SUMMARY)
    code, out = suite.run("-n", "2")
    assert code == 0 and "2 passed" in out, out[-5000:]
    recs = suite.records()
    assert len(recs) == 2
    assert_nothing_left([suite], recs)


def test_runs_that_end_with_failures_and_killed_forks_leave_nothing_behind(inner):
    suite = inner(SUITE_ENDINGS, pool_index=3)
    code, out = suite.run("-n", "2")
    assert code == 1 and "1 failed, 3 passed" in out, out[-5000:]
    assert "intended failure" in out
    recs = suite.records()
    assert len(recs) == 6 and len({r["bridge"] for r in recs}) == 1
    assert_nothing_left([suite], recs)
