"""The subnet pool and the names derived from a subnet.

A run leases one subnet of the pool (:mod:`pytest_vmfork.net.leases`); its
bridge, its forks' TAP names and MACs are all derived from that subnet, so
leasing the subnet leases the names too and no second registry is needed.
Nothing here touches a lease file; :func:`host_networks` only reads netlink.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Sequence

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.net.netlink import iproute, off_loop

DEFAULT_POOL = "10.213.0.0/16"
DEFAULT_PREFIX = 24
MIN_PREFIX = 16  # keeps a fork index within the 4 hex digits of a TAP name
MAX_PREFIX = 29  # the smallest subnet that still holds a few forks
MAX_POOL_SUBNETS = 65536  # carving is eager; bound it
IFNAMSIZ = 15  # usable characters of a Linux interface name

BRIDGE_PREFIX = "vmfk"
TAP_PREFIX = "vt"
MAC_PREFIX = "52:54"  # 0x52: locally administered, unicast

_PRIVATE = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_BRIDGE_RE = re.compile(rf"{BRIDGE_PREFIX}[0-9a-f]{{8}}")
_TAP_RE = re.compile(rf"{TAP_PREFIX}[0-9a-f]{{12}}")


# --- names --------------------------------------------------------------------


def bridge_name(subnet: IPv4Network) -> str:
    """``vmfk`` + the network address in hex: 12 characters, unique per subnet,
    so leasing the subnet leases the name."""
    return f"{BRIDGE_PREFIX}{int(subnet.network_address):08x}"


def is_bridge_name(name: object) -> bool:
    """Whether ``name`` has the shape of :func:`bridge_name`'s names: a recorded
    bridge is deleted only if it does, never an arbitrary interface."""
    return isinstance(name, str) and _BRIDGE_RE.fullmatch(name) is not None


def is_tap_name(name: object) -> bool:
    """Whether ``name`` has the shape of :func:`tap_name`'s names (gc deletes no other TAP)."""
    return isinstance(name, str) and _TAP_RE.fullmatch(name) is not None


def tap_name(subnet: IPv4Network, index: int) -> str:
    """``vt`` + network address + host index in hex: 14 characters."""
    return f"{TAP_PREFIX}{int(subnet.network_address):08x}{index:04x}"


def mac_for(address: IPv4Address | str) -> str:
    """``52:54`` + the four bytes of the IPv4 address: locally administered,
    unicast, and unique wherever the addresses are (subnets of concurrent runs
    never overlap)."""
    raw = IPv4Address(address).packed
    return MAC_PREFIX + "".join(f":{b:02x}" for b in raw)


def subnet_stem(subnet: IPv4Network) -> str:
    """``10-213-0-0-24`` for 10.213.0.0/24: the subnet as a file-name part
    (lease and tombstone files are named by it)."""
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


def as_pool(pool: Sequence[IPv4Network] | str) -> list[IPv4Network]:
    """A pool given as text (parsed with the default prefix) or as subnets."""
    if isinstance(pool, str):
        return parse_pool(pool)
    subnets = list(pool)
    if not subnets or not all(isinstance(n, IPv4Network) for n in subnets):
        raise ConfigError("subnet pool must be a pool string or a non-empty list of IPv4Network")
    return subnets


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
