"""The host side of a run's network on real kernel objects: bridges, TAPs,
veth pairs and network namespaces standing in for guests. No VMs.

Every object is created by the test that needs it and removed in a finally
block or fixture; each xdist worker draws subnets from its own pool so
parallel workers never race for the same bridge name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import socket
import statistics
import struct
import subprocess
import time
from collections import Counter
from ipaddress import IPv4Network
from pathlib import Path
from typing import Iterator

import pytest
from pyroute2 import IPRoute, NetNS, netns

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import private, procid
from pytest_vmfork.mailbox import format_ack
from pytest_vmfork.net import forkleases, leaseroot, leases, subnets
from pytest_vmfork.net import network as nw

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
POOL = f"10.214.{int(_WORKER) % 16 * 16 if _WORKER.isdigit() else 0}.0/20"
SUBNETS = subnets.parse_pool(POOL)
TUNGETIFF = 0x800454D2
IFF_PERSIST = 0x0800


def _why_no_kernel_objects() -> str | None:
    if not nw.has_net_admin():
        return "creating bridges, TAPs and namespaces needs CAP_NET_ADMIN (run as root)"
    if not os.path.exists(nw.TUN_DEVICE):
        return f"{nw.TUN_DEVICE} is missing (modprobe tun)"
    return None


needs_root = pytest.mark.skipif(_why_no_kernel_objects() is not None, reason=str(_why_no_kernel_objects()))


def link(name: str) -> dict | None:
    """What the kernel says about interface ``name`` (None if absent)."""
    index = nw.link_index(name)
    if index is None:
        return None
    with IPRoute() as ipr:
        msg = ipr.get_links(index)[0]
        addrs = [f"{a.get('address')}/{a['prefixlen']}"
                 for a in ipr.get_addr(index=index, family=socket.AF_INET)]
    info = msg.get("IFLA_LINKINFO") or {}
    data = info.get("IFLA_INFO_DATA") or {}
    return {
        "index": index,
        "kind": info.get("IFLA_INFO_KIND"),
        "master": msg.get("IFLA_MASTER"),
        "up": bool(msg["flags"] & 1),
        "mac": msg.get("IFLA_ADDRESS"),
        "addrs": addrs,
        "forward_delay": data.get("IFLA_BR_FORWARD_DELAY"),
        "stp": data.get("IFLA_BR_STP_STATE"),
    }


@pytest.fixture
def make_net(tmp_path: Path) -> Iterator:
    """RunNetworks on a private lease root, always brought down afterwards."""
    made: list[nw.RunNetwork] = []

    def make(run_id: str, **kw: object) -> nw.RunNetwork:
        kw.setdefault("pool", POOL)
        kw.setdefault("lease_root", tmp_path)
        net = nw.RunNetwork(run_id, **kw)  # type: ignore[arg-type]
        made.append(net)
        return net

    yield make
    bridges = [n.lease.bridge for n in made if n.lease]
    for net in made:
        net.down()
    for name in bridges:
        assert link(name) is None, f"{name} left behind"


@pytest.fixture
def live_child() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@contextlib.contextmanager
def fake_fork(net: nw.RunNetwork, fork: forkleases.ForkLease,
              extra_ips: tuple[str, ...] = ()) -> Iterator[str]:
    """A namespace plugged into the run bridge by a veth pair, configured the
    way the guest agent configures a fork: eth0 with the fork's MAC and address."""
    ns = f"vmfkt-{secrets.token_hex(4)}"
    host_if = f"vh{secrets.token_hex(6)}"
    netns.create(ns)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            ipr.link("set", index=nw.link_index(host_if), master=nw.link_index(net.bridge), state="up")
        with NetNS(ns) as nsr:
            eth0 = nsr.link_lookup(ifname="eth0")[0]
            nsr.link("set", index=eth0, address=fork.mac)
            for ip in (fork.ipv4, *extra_ips):
                nsr.addr("add", index=eth0, address=ip, prefixlen=fork.prefix)
            nsr.link("set", index=eth0, state="up")
            nsr.link("set", index=nsr.link_lookup(ifname="lo")[0], state="up")
        yield ns
    finally:
        nw.delete_link(host_if)  # takes the peer with it
        netns.remove(ns)
        assert link(host_if) is None


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Sockets created in this block live in ``ns`` (setns on this thread only)."""
    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()


# --- pure helpers (no kernel objects) ----------------------------------------------


def test_user_netdev_describes_the_slirp_fallback():
    assert nw.user_netdev() == ["type=user", "net=10.0.2.0/24"]
    assert nw.user_netdev([(2222, 22), (0, 8080)], restrict=True) == [
        "type=user", "net=10.0.2.0/24", "restrict=on",
        "hostfwd=tcp:127.0.0.1:2222-:22", "hostfwd=tcp:127.0.0.1:0-:8080",
    ]
    with pytest.raises(ConfigError, match=r"invalid port forward \(1, 0\).*guest 1-65535"):
        nw.user_netdev([(1, 0)])
    with pytest.raises(ConfigError, match="invalid user network"):
        nw.user_netdev(net="nope")


def test_tap_netdev_has_no_vnet_hdr_option():
    assert nw.tap_netdev(7) == ["type=tap", "fd=7"]
    assert nw.tap_netdev(7, vhost=True) == ["type=tap", "fd=7", "vhost=on"]


def test_has_net_admin_reads_the_effective_capabilities():
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16)
    assert nw.has_net_admin() is bool(cap_eff & (1 << 12))


def test_fork_network_payload(tmp_path):
    fork = forkleases.RunLeases("p", "10.214.0.0/24", tmp_path).lease_at(5, {"owner": "vm"}, Path("x"))
    fnet = nw.ForkNetwork.from_lease(fork, "vmfk0ad60000", 40000)
    assert fnet.cidr == "10.214.0.5/24"
    assert fnet.payload() == {
        "interface": "eth0", "mac": "52:54:0a:d6:00:05", "ipv4": "10.214.0.5", "prefix": 24,
        "gateway": "10.214.0.1", "ack_host": "10.214.0.1", "ack_port": 40000,
    }


def test_ack_listener_filters_on_loopback():
    with nw.AckListener("127.0.0.1") as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert listener.port > 0
        s.sendto(b"vmfork-ack stage=applied gen=1", ("127.0.0.1", listener.port))
        t0 = time.monotonic()
        assert listener.wait({"stage": "applied", "gen": "10"}, "127.0.0.1", timeout=0.2) is None
        assert 0.2 <= time.monotonic() - t0 < 1.0
        assert listener.wait({"gen": "1"}, "127.0.0.2", timeout=0.05) is None  # nothing new
        s.sendto(b"vmfork-ack stage=applied gen=1", ("127.0.0.1", listener.port))
        assert listener.wait({"gen": 1}, "127.0.0.1", timeout=2) == {"stage": "applied", "gen": "1"}
    assert listener.sock.fileno() == -1


# --- run networks -------------------------------------------------------------------


@needs_root
def test_run_network_up_and_down_leaves_nothing(make_net, tmp_path):
    net = make_net("solo")
    assert net.down() is False  # nothing was created: fine
    net.up()
    assert net.up() is net  # idempotent
    br = link(net.bridge)
    assert br is not None and br["kind"] == "bridge" and br["up"]
    assert br["addrs"] == [f"{net.gateway}/{net.subnet.prefixlen}"]
    assert (br["forward_delay"], br["stp"]) == (0, 0)
    assert br["mac"] == subnets.mac_for(net.gateway)
    assert net.subnet in SUBNETS and net.bridge == subnets.bridge_name(net.subnet)
    lease_file = net.lease.path
    assert lease_file.exists()
    fork = net.allocate("vm1")
    assert fork.gateway == net.gateway and IPv4Network(f"{fork.ipv4}/32").subnet_of(net.subnet)
    bridge = net.bridge
    assert net.down() is True
    assert net.down() is False  # twice is fine
    assert link(bridge) is None and not lease_file.exists()
    assert not leaseroot.run_lease_dir("solo", tmp_path).exists()
    assert not list((tmp_path / "host").glob("*.json"))
    with pytest.raises(VMForkError, match="not up"):
        net.allocate("vm2")


@needs_root
def test_two_runs_get_their_own_bridges_at_once(make_net):
    a, b = make_net("run-a").up(), make_net("run-b").up()
    assert a.subnet != b.subnet and a.bridge != b.bridge
    assert link(a.bridge) and link(b.bridge)
    assert not a.subnet.overlaps(b.subnet)


@needs_root
def test_workers_of_one_run_share_the_bridge_until_the_last_leaves(make_net):
    first, second = make_net("shared").up(), make_net("shared").up()
    bridge = first.bridge
    assert second.lease.joined and second.bridge == bridge
    assert first.down() is False and link(bridge) is not None
    assert second.down() is True and link(bridge) is None


@needs_root
def test_up_works_from_inside_a_running_event_loop(make_net):
    net = make_net("in-loop")

    async def main() -> str:
        net.up()
        return net.bridge

    bridge = asyncio.run(main())
    assert link(bridge) is not None


@needs_root
def test_stale_lease_is_reclaimed_with_its_bridge_and_a_live_one_is_not(make_net, tmp_path, live_child):
    dead_subnet, live_subnet = SUBNETS[0], SUBNETS[1]
    dead_bridge, live_bridge = subnets.bridge_name(dead_subnet), subnets.bridge_name(live_subnet)
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        # what a SIGKILLed run leaves: its bridge (with address) and its lease
        nw.ensure_bridge(dead_bridge, dead_subnet)
        nw.ensure_bridge(live_bridge, live_subnet)
        host = tmp_path / "host"
        host.mkdir()
        for subnet, run_id, pid in ((dead_subnet, "dead", gone.pid), (live_subnet, "alive", live_child.pid)):
            private.write_json(leases.lease_path(host, subnet), {
                "subnet": str(subnet), "bridge": subnets.bridge_name(subnet), "run_id": run_id,
                "owner_pid": pid, "owner_start_time": procid.process_start_time(pid) if pid != gone.pid else 1,
                "created": time.time(),
            })
        (tmp_path / "runs" / "dead").mkdir(parents=True)

        net = make_net("next").up()
        assert [(s.run_id, s.bridge, s.reason) for s in net.reclaimed] == [
            ("dead", dead_bridge, f"pid {gone.pid} does not exist")
        ]
        assert link(dead_bridge) is None and link(live_bridge) is not None
        assert net.subnet not in (dead_subnet, live_subnet)
        assert not (tmp_path / "runs" / "dead").exists()
        assert not list(host.glob("reclaim-*"))
        # the reclaimed subnet is free again for the run after
        assert make_net("after").up().subnet == dead_subnet
    finally:
        nw.delete_link(dead_bridge)
        nw.delete_link(live_bridge)


# --- TAPs -----------------------------------------------------------------------------


@needs_root
def test_open_tap_joins_the_bridge_and_vanishes_with_its_fd(make_net):
    net = make_net("taps").up()
    fork = net.allocate("vm-tap")
    fd = nw.open_tap(fork.tap, net.bridge)
    try:
        assert not os.get_inheritable(fd)
        tap = link(fork.tap)
        assert tap is not None and tap["master"] == link(net.bridge)["index"] and tap["up"]
        flags = struct.unpack("16sH22x", fcntl.ioctl(fd, TUNGETIFF, bytes(40)))[1]
        assert flags & nw.TAP_FLAGS == nw.TAP_FLAGS and not flags & IFF_PERSIST
        assert link(net.bridge)["mac"] == subnets.mac_for(net.gateway)  # a port does not change it
        with pytest.raises(VMForkError, match=f"TAP {fork.tap} already exists and is in use"):
            nw.open_tap(fork.tap, net.bridge)
    finally:
        os.close(fd)
    assert link(fork.tap) is None  # non-persistent: gone with the last fd


@needs_root
def test_open_tap_reports_bad_input(make_net):
    with pytest.raises(VMForkError, match="bridge vmfkffffffff does not exist"):
        nw.open_tap("vtffffffff0002", "vmfkffffffff")
    with pytest.raises(ConfigError, match="invalid TAP name"):
        nw.open_tap("x" * 16, "lo")
    assert link("vtffffffff0002") is None


@needs_root
def test_open_tap_is_fast(make_net):
    net = make_net("tapspeed").up()
    fork = net.allocate("vm")
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        fd = nw.open_tap(fork.tap, net.bridge)
        times.append(time.perf_counter() - t0)
        os.close(fd)
    assert statistics.median(times) < 0.1


# --- the datapath, with a namespace for a guest ---------------------------------------


@needs_root
def test_udp_both_ways_and_only_the_right_ack_counts(make_net):
    net = make_net("datapath").up()
    # strict reverse-path filtering on the bridge still passes fork traffic
    Path(f"/proc/sys/net/ipv4/conf/{net.bridge}/rp_filter").write_text("1")
    fork, other = net.allocate("vm-real"), net.allocate("vm-other")
    with fake_fork(net, fork, extra_ips=(other.ipv4,)) as ns:
        with inside(ns):
            guest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            guest.bind((fork.ipv4, 0))
            spoofer.bind((other.ipv4, 0))
            guest.settimeout(5)

            # host -> guest, straight over the bridge
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
                host.sendto(b"ping", (fork.ipv4, guest.getsockname()[1]))
            data, src = guest.recvfrom(64)
            assert (data, src[0]) == (b"ping", net.gateway)

            # guest -> host: only the exact ack from the fork's own address counts
            with nw.AckListener(net.gateway) as listener:
                fnet = nw.ForkNetwork.from_lease(fork, net.bridge, listener.port)
                to = (fnet.payload()["ack_host"], fnet.payload()["ack_port"])
                expect = {"stage": "applied", "gen": "7", "nonce": "c0ffee"}
                good = format_ack(stage="applied", mailbox="vmfork", gen=7, nonce="c0ffee")
                spoofer.sendto(good, to)  # right fields, wrong sender
                guest.sendto(b"vmfork-ack stage=applied gen=7 gen=7 nonce=c0ffee", to)  # malformed
                guest.sendto(b"\xffgarbage", to)  # malformed
                guest.sendto(format_ack(stage="applied", gen=70, nonce="c0ffee"), to)  # near miss
                guest.sendto(format_ack(stage="applied", gen=7, nonce="c0ffe"), to)  # near miss
                guest.sendto(format_ack(stage="applied", nonce="c0ffee"), to)  # missing field
                t0 = time.monotonic()
                assert listener.wait(expect, fork.ipv4, timeout=0.3) is None
                assert time.monotonic() - t0 >= 0.3
                # malformed ones are dropped; well-formed near misses are held, never returned here
                assert Counter(s for s, _ in listener.ignored) == {fork.ipv4: 2}
                assert Counter(str(s) for s, _ in listener.pending) == {other.ipv4: 1, fork.ipv4: 3}

                guest.sendto(good, to)
                got = listener.wait(expect, fork.ipv4, timeout=5)
                assert got == {"stage": "applied", "mailbox": "vmfork", "gen": "7", "nonce": "c0ffee"}
        finally:
            guest.close()
            spoofer.close()


def test_ack_listener_keeps_an_early_ack_for_the_wait_that_wants_it():
    with nw.AckListener("127.0.0.1") as listener, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"vmfork-ack stage=applied mailbox=cfg gen=3", ("127.0.0.1", listener.port))
        s.sendto(b"vmfork-ack stage=applied mailbox=vmfork gen=3", ("127.0.0.1", listener.port))
        assert listener.wait({"mailbox": "vmfork"}, "127.0.0.1", timeout=2)["gen"] == "3"
        assert listener.wait({"mailbox": "cfg"}, "127.0.0.1", timeout=0.01) is not None
        assert listener.wait({"mailbox": "cfg"}, "127.0.0.1", timeout=0.01) is None  # consumed once
