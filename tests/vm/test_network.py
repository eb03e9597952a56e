"""Fork networking end to end: real forks on real TAPs of the run's bridge.

Traffic only ever goes to addresses of forks (and bridges) these tests create.
Servers in the guest are python3 one-file scripts started detached; the host
side polls them with bounded retries (bounded count and time).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

import pytest
from pyroute2 import IPRoute

from pytest_vmfork import Run, fork
from pytest_vmfork.net import leases
from pytest_vmfork.net import network as nw

ECHO_PORT = 7000

#: UDP and TCP echo on one port; every reply is ``tag|peer address|data`` so the
#: sender sees which guest answered and from which address the guest saw it.
ECHO_SERVER = r"""
import socket, sys, threading
port, tag = int(sys.argv[1]), sys.argv[2].encode()

def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(tag + b"|" + peer[0].encode() + b"|" + data, peer)

def serve(conn, peer):
    with conn:
        chunks = []
        while True:
            data = conn.recv(65535)
            if not data:
                break
            chunks.append(data)
        conn.sendall(tag + b"|" + peer[0].encode() + b"|" + b"".join(chunks))

tcp = socket.socket()
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(16)
threading.Thread(target=udp, daemon=True).start()
while True:
    conn, peer = tcp.accept()
    threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
"""

#: A UDP client for the guest: one echo round trip with bounded retries.
GUEST_UDP_CLIENT = r"""
import socket, sys, time
ip, port, payload = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.5)
s.connect((ip, port))
for _ in range(40):
    try:
        s.send(payload)
        sys.stdout.buffer.write(s.recv(65535))
        sys.exit(0)
    except (socket.timeout, ConnectionRefusedError, OSError):
        time.sleep(0.2)
sys.exit(1)
"""


def start_echo(vm, tag: str, port: int = ECHO_PORT) -> None:
    vm.exec(["sh", "-c", "cat > /tmp/echo.py"], input=ECHO_SERVER).check()
    vm.exec(f"python3 /tmp/echo.py {port} {tag} >/dev/null 2>&1 &").check()


def udp_echo(ip: str, payload: bytes, port: int = ECHO_PORT, *, within: float = 30.0) -> bytes:
    """One UDP round trip to ``ip``, retried until the server is up (bounded)."""
    end = time.monotonic() + within
    last: object = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.connect((ip, port))  # connected: only replies from ip:port count
        for _ in range(200):
            try:
                s.send(payload)
                return s.recv(65535)
            except OSError as exc:  # timeout, port unreachable (server not up yet), ...
                last = exc
            if time.monotonic() > end:
                break
            time.sleep(0.1)
    raise AssertionError(f"no UDP echo from {ip}:{port} within {within:g}s (last error: {last!r})")


def tcp_echo(ip: str, payload: bytes, port: int = ECHO_PORT, *, within: float = 30.0) -> bytes:
    """Connect, send, half-close, read to EOF; retried until the server is up (bounded)."""
    end = time.monotonic() + within
    last: object = None
    for _ in range(200):
        try:
            with socket.create_connection((ip, port), timeout=5) as conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                chunks = []
                while data := conn.recv(65535):
                    chunks.append(data)
                return b"".join(chunks)
        except OSError as exc:  # refused before the server listens, ...
            last = exc
        if time.monotonic() > end:
            break
        time.sleep(0.1)
    raise AssertionError(f"no TCP echo from {ip}:{port} within {within:g}s (last error: {last!r})")


def link_of(name: str) -> dict | None:
    """The kernel's view of interface ``name`` (None if it does not exist)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        msg = ipr.get_links(found[0])[0]
        addrs = [ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                 for a in ipr.get_addr(index=found[0], family=socket.AF_INET)]
        master = msg.get("IFLA_MASTER")
        return {
            "index": found[0],
            "kind": (msg.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_KIND"),
            "master": ipr.get_links(master)[0].get("IFLA_IFNAME") if master else None,
            "up": bool(msg["flags"] & 1),
            "addrs": addrs,
        }


def bridge_of(vm) -> tuple[str, ipaddress.IPv4Interface]:
    """The bridge the fork's TAP is enslaved to and the bridge's (gateway) address."""
    tap = link_of(vm.tap)
    assert tap is not None and tap["up"], f"TAP {vm.tap} of {vm.name} is missing or down"
    bridge = link_of(tap["master"])
    assert bridge is not None and bridge["kind"] == "bridge"
    (gateway,) = bridge["addrs"]
    return tap["master"], gateway


def guest_eth0(vm) -> tuple[str, list[str]]:
    """(MAC, IPv4 addresses with prefix) of the guest's eth0, as the guest sees them."""
    mac = vm.exec(["cat", "/sys/class/net/eth0/address"]).check().stdout.decode().strip()
    out = vm.exec(["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).check().stdout.decode()
    addrs = [word for line in out.splitlines() for prev, word in zip(line.split(), line.split()[1:])
             if prev == "inet"]
    return mac, addrs


def parse_reply(reply: bytes) -> tuple[str, str, bytes]:
    tag, peer, data = reply.split(b"|", 2)
    return tag.decode(), peer.decode(), data


# --- the plugin's run network -------------------------------------------------------


def test_fork_answers_udp_and_tcp_echo_at_its_own_address_directly(vm):
    assert vm.timings["handoff_path"] in ("ack", "ctl-fallback") and vm.timings["handoff_ms"] > 0
    _, gateway = bridge_of(vm)
    start_echo(vm, vm.name)
    tag, peer, data = parse_reply(udp_echo(vm.ip, b"udp-ping"))
    assert (tag, data) == (vm.name, b"udp-ping")
    # No NAT, no forwarding: the guest sees the bridge's own address as the sender.
    assert peer == str(gateway.ip)
    tag, peer, data = parse_reply(tcp_echo(vm.ip, b"tcp-ping" * 1000))
    assert (tag, peer, data) == (vm.name, str(gateway.ip), b"tcp-ping" * 1000)


def test_forks_of_one_run_reach_each_other_by_ip(vm_factory):
    a, b = vm_factory(), vm_factory()
    start_echo(b, b.name)
    a.exec(["sh", "-c", "cat > /tmp/udpc.py"], input=GUEST_UDP_CLIENT).check()
    res = a.exec(["python3", "/tmp/udpc.py", b.ip, str(ECHO_PORT), f"from-{a.name}"], timeout=60)
    assert res.returncode == 0, f"{a.name} got no UDP echo from {b.ip}: {res.stderr!r}"
    tag, peer, data = parse_reply(res.stdout)
    assert (tag, peer, data) == (b.name, a.ip, f"from-{a.name}".encode())
    # and the other way round, with ICMP (busybox ping in the guest)
    ping = b.exec(["busybox", "ping", "-c", "2", "-W", "5", a.ip], timeout=30)
    assert ping.returncode == 0 and b" 0% packet loss" in ping.stdout, ping.stdout + ping.stderr


def test_two_forks_get_distinct_addresses_and_macs_that_the_guests_really_have(vm_factory):
    a, b = vm_factory(), vm_factory()
    assert a.ip != b.ip and a.mac != b.mac and a.tap != b.tap
    bridge_a, gateway = bridge_of(a)
    bridge_b, _ = bridge_of(b)
    assert bridge_a == bridge_b, "forks of one run must share the run's bridge"
    subnet = gateway.network
    for machine in (a, b):
        ip = ipaddress.ip_address(machine.ip)
        assert ip in subnet and ip not in (gateway.ip, subnet.network_address, subnet.broadcast_address)
        mac, addrs = guest_eth0(machine)
        assert mac == machine.mac.lower()
        assert addrs == [f"{machine.ip}/{subnet.prefixlen}"], f"{machine.name} eth0: {addrs}"
        route = machine.exec(["ip", "route", "show", "default"]).check().stdout.decode()
        assert f"via {gateway.ip} dev eth0" in route
        assert machine.timings["handoff_path"] == "ack"
        assert 0 < machine.timings["handoff_ms"] <= machine.timings["restore_to_healthy_ms"]


def test_the_handoff_gives_the_guest_the_gateways_real_mac_so_no_arp_is_needed(vm):
    bridge, gateway = bridge_of(vm)
    real = Path(f"/sys/class/net/{bridge}/address").read_text().strip()
    out = vm.exec(["ip", "neigh", "show", "dev", "eth0", str(gateway.ip)]).check().stdout.decode()
    assert f"lladdr {real} " in out, out  # the handoff writes it (REACHABLE): a wrong one would break the ack
    assert "FAILED" not in out and "INCOMPLETE" not in out, out
    assert vm.timings["handoff_path"] == "ack"


def same_link_exists(name: str, index: int) -> bool:
    """Whether the interface ``index`` still exists under ``name``. Interface
    indexes are not reused soon, names are: another fork of the run (another
    xdist worker, the warm pool) may get the freed address and TAP name at once."""
    try:
        return socket.if_indextoname(index) == name
    except OSError:
        return False


def test_closing_a_fork_removes_its_tap(vm_factory):
    machine = vm_factory()
    tap = machine.tap
    handles = json.loads((machine.dir / "handles.json").read_text())
    assert handles["tap"] == tap and handles["ip"] == machine.ip
    bridge, _ = bridge_of(machine)
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=tap)
    assert link_of(tap)["master"] == bridge
    pid = machine.pid
    machine.close()
    assert not same_link_exists(tap, index), f"TAP {tap} outlived its fork"
    with IPRoute() as ipr:
        assert index not in ipr.link_lookup(ifname=tap)  # gone, or the name is a newer fork's TAP now
    assert not os.path.exists(f"/proc/{pid}")
    assert link_of(bridge) is not None, "closing one fork must not take the run's bridge"


def test_tap_disappears_when_the_qemu_process_dies_without_close(vm_factory):
    machine = vm_factory()
    tap = machine.tap
    index = socket.if_nametoindex(tap)
    os.kill(machine.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while same_link_exists(tap, index) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not same_link_exists(tap, index), f"TAP {tap} survived its SIGKILLed QEMU (a persistent TAP?)"


# --- a private run network: the control channel fallback ------------------------------


@pytest.fixture
def private_net(tmp_path: Path) -> Iterator[tuple[nw.RunNetwork, Run]]:
    """A run network of its own (own run id, own lease root, own pool), so its
    bridge can be tampered with without disturbing the session's forks."""
    run = Run(run_id=f"nettest-{secrets.token_hex(4)}")
    net = nw.RunNetwork(run.run_id, pool="10.216.32.0/22", lease_root=tmp_path / "leases").up()
    bridge = net.bridge
    try:
        yield net, run
    finally:
        net.down()
        run.remove()
        assert link_of(bridge) is None, f"{bridge} left behind"
        assert leases.list_subnet_leases(tmp_path / "leases") == []


def set_bridge_mac(bridge: str, mac: str) -> None:
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=bridge)[0], address=mac)


def test_a_lost_ack_takes_the_control_channel_fallback_and_the_fork_still_works(vmfork_snapshot, private_net):
    net, run = private_net
    # The handoff tells the guest the bridge's MAC (no ARP): while the bridge has
    # another one, the guest's UDP ack goes to a MAC nobody has and is lost.
    set_bridge_mac(net.bridge, "02:00:5e:00:53:01")
    try:
        machine = fork(vmfork_snapshot, run=run, network=net, handoff_timeout=0.5)
    finally:
        set_bridge_mac(net.bridge, net.gateway_mac)
    with machine:
        assert machine.timings["handoff_path"] == "ctl-fallback"
        assert machine.timings["handoff_ms"] >= 500  # it waited the whole handoff timeout first
        mac, addrs = guest_eth0(machine)  # applied (again) by ReconfigureNetwork
        assert (mac, addrs) == (machine.mac.lower(), [f"{machine.ip}/{net.subnet.prefixlen}"])
        start_echo(machine, machine.name)
        assert parse_reply(udp_echo(machine.ip, b"after-fallback")) == (
            machine.name, net.gateway, b"after-fallback")
        assert parse_reply(tcp_echo(machine.ip, b"tcp-after-fallback")) == (
            machine.name, net.gateway, b"tcp-after-fallback")
        # Control: on the same network with ARP answered, the ack arrives.
        with fork(vmfork_snapshot, run=run, network=net, handoff_timeout=5) as other:
            assert other.timings["handoff_path"] == "ack"
            assert other.ip != machine.ip


def test_user_mode_network_gives_outbound_traffic_and_a_forwarded_port(vmfork_snapshot):
    """The unprivileged fallback: the guest reaches the host (QEMU's NAT maps
    10.0.2.2 to the host's loopback) and vm.host_port() forwards a guest port."""
    import socket as _socket
    import threading as _threading

    from pytest_vmfork import Run, fork

    listener = _socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(30)
    got: list[bytes] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with conn:
            got.append(conn.recv(64))

    acceptor = _threading.Thread(target=accept, daemon=True)
    acceptor.start()
    run = Run()
    try:
        with fork(vmfork_snapshot, run=run, network="user") as vm:
            assert vm.timings["handoff_path"] == "ack"
            port = listener.getsockname()[1]
            out = vm.exec(["python3", "-c", f"import socket; s=socket.create_connection(('10.0.2.2', {port}), 10);"
                           "s.sendall(b'from-guest'); s.close()"])
            assert out.returncode == 0, out.stderr
            acceptor.join(30)
            assert got == [b"from-guest"]
            server = ("import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"
                      "s.bind(('0.0.0.0', 7777)); s.listen(1); c, _ = s.accept(); c.sendall(c.recv(64).upper())")
            vm.exec(f'python3 -c "{server}" >/dev/null 2>&1 &').check()
            host_port = vm.host_port(7777)
            for _ in range(100):  # bounded: the guest server takes a moment to listen
                try:
                    with _socket.create_connection(("127.0.0.1", host_port), timeout=5) as c:
                        c.sendall(b"ping")
                        reply = c.recv(64)
                    if reply:
                        break
                except OSError:
                    reply = b""
                time.sleep(0.1)
            assert reply == b"PING"
    finally:
        listener.close()
        run.remove()
