"""The host side of a run's network: one bridge per run, one TAP per fork.

Topology::

    test process (host) ── vmfk<subnet> bridge, gateway .1/prefix
                              ├── vt<subnet><index> TAP ── QEMU fork (.2)
                              └── vt<subnet><index> TAP ── QEMU fork (.3)

The test process reaches every fork directly: the bridge carries the gateway
address, so the kernel routes the run's subnet onto it. No NAT, no forwarding,
no firewall rules; forks have no way off the bridge.

TAPs are **non-persistent**: :func:`open_tap` creates one by opening
``/dev/net/tun`` (``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI``),
and hands the fd to QEMU. The kernel deletes the TAP when its last fd closes,
so a SIGKILLed QEMU cannot leak one. The matching QEMU options are::

    -netdev type=tap,id=net0,fd=N     (see tap_netdev(); N passed with pass_fds)
    -device virtio-net-pci,netdev=net0,mac=...

``type=`` is spelled out so the options may follow ``id=``: QEMU 7.2 takes a
bare ``tap`` only as the *first* item and otherwise fails ("Parameter 'type'
is missing").

Do **not** add ``vnet_hdr=``: QEMU rejects ``vnet_hdr=`` (and ``ifname=``,
``script=``, ``queues=``) together with ``fd=`` ("... are invalid with fd=",
checked with QEMU 7.2) and instead probes the fd with ``TUNGETIFF``. The TAP is
created *without* ``IFF_VNET_HDR``, so the fork's NIC has no virtio-net header
backend, like the template's (a hub port): a snapshot of a TAP fork
(``vm.snapshot()``) then loads with any backend, where one saved with a header
backend loads only with one ("saved image requires vnet_hdr=on"). Nothing is
lost: the guest negotiated its NIC features at the template's boot, without
checksum/segmentation offload. ``IFF_NO_PI`` drops the 4-byte packet-info prefix QEMU does not expect;
``IFF_MULTI_QUEUE`` is not set (one queue per fork). ``vhost=on`` may be added
if ``/dev/vhost-net`` is available.

Without CAP_NET_ADMIN none of this is possible; :func:`user_netdev` describes
the user-mode (slirp) fallback instead.

pyroute2 0.9's synchronous API runs its own asyncio loop and fails inside a
running one, so every netlink call here goes through :func:`off_loop`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.mailbox import parse_ack
from pytest_vmfork.net import leaseroot, subnets
from pytest_vmfork.net.forkleases import ForkLease, RunLeases
from pytest_vmfork.net.leases import StaleLease, SubnetLease, acquire_subnet, finish_reclaim, release_subnet
from pytest_vmfork.net.netlink import iproute as _iproute
from pytest_vmfork.net.netlink import netlink_code as _netlink_code
from pytest_vmfork.net.netlink import off_loop

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI  # no IFF_VNET_HDR: see the module docstring
CAP_NET_ADMIN = 12
USER_NET = "10.0.2.0/24"
NO_CAP_HINT = "run as root (or grant CAP_NET_ADMIN) or use --vmfork-network=user"


def has_net_admin() -> bool:
    """Whether this process may create bridges and TAPs (CapEff bit 12)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def link_index(name: str) -> int | None:
    """The interface's index, None if there is no such interface."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def link_exists(name: str) -> bool:
    return link_index(name) is not None


def delete_link(name: str) -> bool:
    """Delete interface ``name``; False if it did not exist."""

    def run() -> bool:
        with _iproute() as ipr:
            try:
                ipr.link("del", ifname=name)
            except Exception as exc:
                code = _netlink_code(exc)
                if code == errno.ENODEV:
                    return False
                if code == errno.EPERM:
                    raise VMForkError(f"deleting {name} needs CAP_NET_ADMIN; {NO_CAP_HINT}") from None
                raise
        return True

    return off_loop(run)


def ensure_bridge(name: str, subnet: IPv4Network) -> None:
    """Create the bridge if missing, give it the gateway address and bring it up.

    Idempotent; callers serialise it per run (see RunNetwork.up). The MAC is
    fixed (``52:54`` + gateway address): otherwise a bridge takes the lowest
    MAC of its ports and would change it whenever a TAP comes or goes,
    breaking the forks' ARP entries for the gateway.
    """
    gateway = subnet.network_address + 1

    def run() -> None:
        with _iproute() as ipr:
            if not link_exists(name):
                try:
                    ipr.link("add", ifname=name, kind="bridge", address=subnets.mac_for(gateway),
                             br_forward_delay=0, br_stp_state=0)
                except Exception as exc:
                    code = _netlink_code(exc)
                    if code == errno.EPERM:
                        raise VMForkError(
                            f"creating bridge {name} needs CAP_NET_ADMIN; {NO_CAP_HINT}"
                        ) from None
                    if code != errno.EEXIST:
                        raise VMForkError(f"creating bridge {name} failed: {exc}") from exc
            index = link_index(name)
            if index is None:
                raise VMForkError(f"bridge {name} vanished while it was being set up")
            link = ipr.get_links(index)[0]
            kind = (link.get("IFLA_LINKINFO") or {}).get("IFLA_INFO_KIND")
            if kind != "bridge":
                raise VMForkError(
                    f"interface {name} exists but is a {kind or 'non-bridge'} device, not a bridge; "
                    "delete it or use another subnet pool"
                )
            try:
                ipr.addr("add", index=index, address=str(gateway), prefixlen=subnet.prefixlen,
                         broadcast=str(subnet.broadcast_address))
            except Exception as exc:
                if _netlink_code(exc) != errno.EEXIST:
                    raise VMForkError(
                        f"assigning {gateway}/{subnet.prefixlen} to {name} failed: {exc}"
                    ) from exc
            ipr.link("set", index=index, state="up")

    off_loop(run)


class RunNetwork:
    """A run's subnet lease and bridge; shared by the run's xdist workers.

    Every worker calls ``up()`` (the first creates, the rest join) and
    ``down()``; the bridge goes away with the last holder.
    """

    def __init__(
        self,
        run_id: str,
        *,
        pool: Sequence[IPv4Network] | str = subnets.DEFAULT_POOL,
        prefix: int = subnets.DEFAULT_PREFIX,
        lease_root: Path | str | None = None,
        lock_timeout: float = leaseroot.LOCK_TIMEOUT,
    ) -> None:
        # validate everything before anything is created
        self.run_id = leaseroot.validate_run_id(run_id)
        self.pool = subnets.parse_pool(pool, prefix) if isinstance(pool, str) else subnets.as_pool(pool)
        self.lease_root = leaseroot.resolve_lease_root(lease_root)
        self.lock_timeout = lock_timeout
        self.lease: SubnetLease | None = None
        self.leases: RunLeases | None = None
        self.reclaimed: tuple[StaleLease, ...] = ()
        self.timings: dict[str, float] = {}

    @property
    def bridge(self) -> str:
        return self._need().bridge

    @property
    def subnet(self) -> IPv4Network:
        return self._need().subnet

    @property
    def gateway(self) -> str:
        return str(self._need().gateway)

    @property
    def gateway_mac(self) -> str:
        """The bridge's MAC, fixed at creation (``mac_for(gateway)``): forks get it in
        their handoff so they need no ARP exchange before their first packet."""
        return subnets.mac_for(self.gateway)

    def _need(self) -> SubnetLease:
        if self.lease is None:
            raise VMForkError(f"run network {self.run_id} is not up; call up() first")
        return self.lease

    def up(self, *, host_nets: Iterable[IPv4Network] | None = None) -> "RunNetwork":
        """Lease a subnet, clean up after dead runs, create the bridge. Idempotent."""
        if self.lease is not None:
            return self
        t0 = time.perf_counter()
        if not has_net_admin():
            raise VMForkError(f"creating a run bridge needs CAP_NET_ADMIN; {NO_CAP_HINT}")
        lease = acquire_subnet(self.run_id, self.pool, lease_root=self.lease_root,
                               host_nets=host_nets, lock_timeout=self.lock_timeout)
        self.lease = lease
        try:
            self.reclaimed = lease.reclaimed
            for stale in lease.reclaimed:  # outside the host lock: deleting a bridge is slow
                delete_link(stale.bridge)
                if stale.run_id != self.run_id:
                    with contextlib.suppress(ConfigError):  # a garbled run id names no directory
                        leaseroot.remove_run(stale.run_id, self.lease_root)
                finish_reclaim(stale)
            self.leases = RunLeases(self.run_id, lease.subnet, self.lease_root,
                                    lock_timeout=self.lock_timeout)
            with self.leases.lock():  # one "create if missing" per run at a time
                ensure_bridge(lease.bridge, lease.subnet)
        except BaseException:
            self.down()
            raise
        self.timings["up_ms"] = (time.perf_counter() - t0) * 1000
        return self

    def down(self) -> bool:
        """Leave the run network; the last holder deletes the bridge and the
        run's lease directory. Safe to call twice or without ``up()``.
        Returns True if this call tore the network down."""
        lease, self.lease, self.leases = self.lease, None, None
        if lease is None:
            return False
        t0 = time.perf_counter()

        def teardown() -> None:
            delete_link(lease.bridge)
            leaseroot.remove_run(self.run_id, self.lease_root)

        last = release_subnet(lease, teardown=teardown, lock_timeout=self.lock_timeout)
        self.timings["down_ms"] = (time.perf_counter() - t0) * 1000
        return last

    def allocate(self, owner: str, *, owner_pid: int | None = None) -> ForkLease:
        """A fork's address, MAC and TAP name."""
        if self.leases is None:
            raise VMForkError(f"run network {self.run_id} is not up; call up() first")
        return self.leases.allocate(owner, owner_pid=owner_pid)

    def release(self, fork: ForkLease) -> None:
        if self.leases is not None:
            self.leases.release(fork)

    def __enter__(self) -> "RunNetwork":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    def __repr__(self) -> str:
        where = f"{self.lease.bridge} {self.lease.subnet}" if self.lease else "down"
        return f"<RunNetwork {self.run_id} {where}>"


def open_tap(name: str, bridge: str) -> int:
    """Create the non-persistent TAP ``name`` on ``bridge``, up; return its fd.

    The fd is not inheritable (pass it with ``pass_fds``) and owns the TAP:
    closing it, or the death of whoever holds it, deletes the interface.
    """
    if not isinstance(name, str) or not 0 < len(name.encode()) <= subnets.IFNAMSIZ or "/" in name:
        raise ConfigError(f"invalid TAP name {name!r}: use 1-{subnets.IFNAMSIZ} characters without '/'")
    bridge_index = link_index(bridge)
    if bridge_index is None:
        raise VMForkError(f"bridge {bridge} does not exist; bring the run network up first")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise VMForkError(
            f"cannot open {TUN_DEVICE}: {exc.strerror}; load the tun module (modprobe tun) "
            f"or make the device available to this container, or use --vmfork-network=user"
        ) from exc
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), TAP_FLAGS))
        except OSError as exc:
            if exc.errno == errno.EPERM:
                raise VMForkError(f"creating TAP {name} needs CAP_NET_ADMIN; {NO_CAP_HINT}") from None
            if exc.errno == errno.EBUSY:
                raise VMForkError(
                    f"TAP {name} already exists and is in use (a QEMU of an earlier fork still "
                    "holds it?); release a fork's lease only after its QEMU has exited"
                ) from None
            raise VMForkError(f"creating TAP {name} failed: {exc.strerror}") from exc
        index = link_index(name)
        if index is None:
            raise VMForkError(f"TAP {name} was created but has no interface index")

        def attach() -> None:
            with _iproute() as ipr:
                ipr.link("set", index=index, master=bridge_index, state="up")

        off_loop(attach)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tap_netdev(fd: int, *, vhost: bool = False) -> list[str]:
    """``-netdev`` options for a TAP fd from :func:`open_tap` (any position
    relative to ``id=``). No ``vnet_hdr=``: QEMU rejects it with ``fd=`` and
    probes the fd instead. The caller passes ``fd`` with ``pass_fds`` and closes
    its own copy right after spawning, or the TAP outlives QEMU."""
    return ["type=tap", f"fd={fd}", *(["vhost=on"] if vhost else [])]


@dataclass(frozen=True)
class ForkNetwork:
    """Everything one fork needs on the network side."""

    ipv4: str
    prefix: int
    gateway: str
    mac: str
    tap: str
    bridge: str
    ack_port: int
    interface: str = "eth0"

    @classmethod
    def from_lease(cls, lease: ForkLease, bridge: str, ack_port: int) -> "ForkNetwork":
        return cls(lease.ipv4, lease.prefix, lease.gateway, lease.mac, lease.tap, bridge, ack_port)

    @property
    def cidr(self) -> str:
        return f"{self.ipv4}/{self.prefix}"

    def payload(self) -> dict[str, Any]:
        """What the host patches into the guest's network mailbox; the guest
        acks to ``gateway:ack_port`` once the address is applied."""
        return {
            "interface": self.interface,
            "mac": self.mac,
            "ipv4": self.ipv4,
            "prefix": self.prefix,
            "gateway": self.gateway,
            "ack_host": self.gateway,
            "ack_port": self.ack_port,
        }


class AckListener:
    """A UDP socket on ``(gateway, ephemeral port)`` that waits for one fork's ack.

    One listener per fork, so a late ack of another fork can never be taken
    for this one; the sender address and every expected field must match too.
    """

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise VMForkError(
                f"cannot listen for acks on {host}:{port}: {exc.strerror}; is the run network up?"
            ) from exc
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]
        self.ignored: list[tuple[str, bytes]] = []  # (sender, datagram) that did not count
        # Well-formed acks that matched no wait yet, with their sender: a fork acks its
        # network and its mailboxes on one port, in any order.
        self.pending: list[tuple[Any, dict[str, str]]] = []

    def wait(self, expect: Mapping[str, str], sender_ip: str, timeout: float) -> dict[str, str] | None:
        """The first ack from ``sender_ip`` whose fields include all of ``expect``
        exactly; None after ``timeout`` seconds. Valid acks from the sender that
        match another expectation are kept for a later ``wait`` (a fork acks its
        network and its mailboxes on one port, in any order)."""
        want = {k: str(v) for k, v in expect.items()}
        sender = ipaddress.ip_address(sender_ip)
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        for held in self.pending:
            if held[0] == sender and all(held[1].get(k) == v for k, v in want.items()):
                self.pending.remove(held)
                return held[1]
        while True:
            while True:  # drain everything queued
                try:
                    data, addr = self.sock.recvfrom(4096)
                except BlockingIOError:
                    break
                source = ipaddress.ip_address(addr[0])
                fields = parse_ack(data)
                if fields is not None and source == sender and all(fields.get(k) == v for k, v in want.items()):
                    return fields
                if fields is not None and len(self.pending) < 64:
                    self.pending.append((source, fields))
                elif len(self.ignored) < 64:
                    self.ignored.append((addr[0], data[:256]))
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller.poll(max(1, int(left * 1000 + 0.999)))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "AckListener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def user_netdev(
    hostfwd_ports: Iterable[tuple[int, int]] = (),
    *,
    net: str = USER_NET,
    restrict: bool = False,
) -> list[str]:
    """``-netdev`` options (any position relative to ``id=``) for QEMU user-mode networking: the
    fallback without CAP_NET_ADMIN. ``hostfwd_ports`` are (host_port,
    guest_port) TCP pairs forwarded from 127.0.0.1 only; host port 0 lets
    QEMU pick one. ``restrict=True`` cuts the guest off from everything but
    the forwards.
    """
    try:
        network = ipaddress.ip_network(net)
    except ValueError as exc:
        raise ConfigError(f"invalid user network {net!r}: {exc}; use e.g. {USER_NET}") from None
    opts = ["type=user", f"net={network}"]
    if restrict:
        opts.append("restrict=on")
    for pair in hostfwd_ports:
        host_port, guest_port = pair
        if not (isinstance(host_port, int) and 0 <= host_port <= 65535) or not (
            isinstance(guest_port, int) and 0 < guest_port <= 65535
        ):
            raise ConfigError(
                f"invalid port forward {pair!r}: use (host_port, guest_port) with host 0-65535 "
                "(0: any free port) and guest 1-65535"
            )
        opts.append(f"hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}")
    return opts
