"""eth0's configuration: the fast netlink apply on resume and the pyroute2 path.

A fork's first network apply is on the resume path, so it uses three or four
rtnetlink requests pre-built at boot (:class:`FastNetlink`); pyroute2 stays for
everything else (a second apply, the host's ReconfigureNetwork fallback on a
thread). The state of what eth0 carries now lives here, under one lock.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from pyroute2 import IPRoute
from vmfork_agent.boot import log
from vmfork_agent.calls import Call, CallError

from pytest_vmfork.proto import agent_pb2 as pb

NUD_REACHABLE = 0x02


class FastNetlink:
    """The resume path's network apply: three rtnetlink requests built at boot.

    pyroute2 builds the messages once, with placeholder values; on resume only
    the MAC, address, prefix and gateway bytes are patched in and the requests
    go out on a plain netlink socket. A cold pyroute2 apply in a freshly
    restored TCG guest costs ~250 ms (every code path is translated again);
    this costs a few. The full pyroute2 path remains for the host's fallback
    and for anything but a fresh fork's interface.
    """

    MAC, IP, GW, GW_MAC = "02:00:5e:10:00:77", "198.51.100.77", "198.51.100.1", "02:00:5e:10:00:01"

    def __init__(self, index: int) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
        from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
        from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
        from pyroute2.netlink.rtnl.ndmsg import ndmsg
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        new = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        link = ifinfmsg()
        link["index"], link["flags"], link["change"] = index, 1, 1  # IFF_UP
        link["attrs"] = [("IFLA_ADDRESS", self.MAC)]
        link["header"]["type"], link["header"]["flags"] = 16, NLM_F_REQUEST | NLM_F_ACK  # RTM_NEWLINK
        addr = ifaddrmsg()
        addr["family"], addr["prefixlen"], addr["index"] = socket.AF_INET, 24, index
        addr["attrs"] = [("IFA_LOCAL", self.IP), ("IFA_ADDRESS", self.IP)]
        addr["header"]["type"], addr["header"]["flags"] = 20, new  # RTM_NEWADDR
        route = rtmsg()
        route["family"], route["table"], route["proto"], route["scope"], route["type"] = socket.AF_INET, 254, 3, 0, 1
        route["attrs"] = [("RTA_GATEWAY", self.GW), ("RTA_OIF", index)]
        route["header"]["type"], route["header"]["flags"] = 24, new  # RTM_NEWROUTE
        neigh = ndmsg()
        neigh["family"], neigh["ifindex"], neigh["state"] = socket.AF_INET, index, NUD_REACHABLE
        neigh["attrs"] = [("NDA_DST", self.GW), ("NDA_LLADDR", self.GW_MAC)]
        neigh["header"]["type"], neigh["header"]["flags"] = 28, new  # RTM_NEWNEIGH
        self.msgs = []
        for msg in (link, addr, route, neigh):
            msg.encode()
            self.msgs.append(bytes(msg.data))
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 1000

    @staticmethod
    def _patch(msg: bytes, old: bytes, new: bytes) -> bytes:
        at = msg.index(old)
        return msg[:at] + new + msg[at + len(old):]

    def apply(self, mac: str, ip: str, prefix: int, gateway: str | None, gateway_mac: str | None,
              marks: list) -> None:
        """Each request's end is appended to ``marks`` (net.link, net.addr, net.route, net.neigh)."""
        link, addr, route, neigh = self.msgs
        link = self._patch(link, _mac_bytes(self.MAC), _mac_bytes(mac))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = self._patch(addr, socket.inet_aton(self.IP), socket.inet_aton(ip))
        addr = addr[:17] + bytes([prefix]) + addr[18:]  # ifa_prefixlen follows nlmsghdr and ifa_family
        batch = [("net.link", link), ("net.addr", addr)]
        if gateway:
            route = self._patch(route, socket.inet_aton(self.GW), socket.inet_aton(gateway))
            batch.append(("net.route", route))
            if gateway_mac:  # the host's bridge: the ack needs no ARP round trip (nor the RX path)
                neigh = self._patch(neigh, socket.inet_aton(self.GW), socket.inet_aton(gateway))
                neigh = self._patch(neigh, _mac_bytes(self.GW_MAC), _mac_bytes(gateway_mac))
                batch.append(("net.neigh", neigh))
        for stage, msg in batch:
            self.seq += 1
            msg = msg[:8] + struct.pack("<I", self.seq) + msg[12:]
            self.sock.send(msg)
            reply = self.sock.recv(65536)
            mtype, = struct.unpack_from("<H", reply, 4)
            error, = struct.unpack_from("<i", reply, 16)
            if mtype != 2 or error != 0:  # NLMSG_ERROR carrying 0 is the ack
                raise OSError(-error, f"rtnetlink request {struct.unpack_from('<H', msg, 4)[0]} failed")
            marks.append((stage, time.monotonic()))



class Network:
    """eth0 as the agent configures it: the fast path for a fresh fork, pyroute2 otherwise."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.lock = threading.Lock()
        self.fast_ok = False
        self.applied: tuple | None = None  # the network config eth0 carries now
        self.warm()

    def warm(self) -> None:
        """Run the apply path once at boot so every lazy import and cache inside
        pyroute2 is already in the snapshot; forks then only pay TCG translation."""
        try:
            self.eth = self.ipr.link_lookup(ifname="eth0")[0]
        except IndexError:
            self.eth = None
            return
        mac = self.ipr.get_links(self.eth)[0].get_attr("IFLA_ADDRESS")
        self.apply({"mac": mac, "ipv4": "169.254.77.77", "prefix": 32, "gateway": None})
        self.ipr.addr("del", index=self.eth, address="169.254.77.77", prefixlen=32)
        self.ipr.link("set", index=self.eth, state="down")
        self.applied = None
        self.fast = FastNetlink(self.eth)
        self.fast_ok = True  # a fresh fork's eth0: down, no address, no neighbours

    def apply_on_resume(self, net: dict, marks: list) -> str:
        """The guest-initiated handoff; returns which path applied it. A resume
        that brings the config already applied (a pre-warmed pool fork's second
        resume, vm.deliver()) changes nothing and only acks."""
        if _net_identity(net) == self.applied:
            return "unchanged"
        if self.fast_ok:
            self.fast_ok = False  # this memory now carries an applied config
            try:
                with self.lock:
                    self.fast.apply(net["mac"], net["ipv4"], int(net["prefix"]), net.get("gateway"),
                                    net.get("gateway_mac"), marks)
                    self.applied = _net_identity(net)
                return "fast"
            except OSError as exc:
                log(f"fast netlink apply failed ({exc}); using pyroute2")
        self.apply(net)
        marks.append(("pyroute2", time.monotonic()))
        return "pyroute2"

    def apply(self, net: dict) -> None:
        """MAC, address, link, default route, stale neighbours: all over netlink."""
        if self.eth is None:
            raise RuntimeError("the guest has no eth0")
        self.fast_ok = False
        with self.lock:
            self.applied = None  # until it all went through
            ipr, idx = self.ipr, self.eth
            ipr.link("set", index=idx, address=net["mac"])
            for addr in ipr.get_addr(index=idx, family=socket.AF_INET):
                ipr.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            ipr.addr("add", index=idx, address=net["ipv4"], prefixlen=int(net["prefix"]))
            ipr.link("set", index=idx, state="up")
            if net.get("gateway"):
                ipr.route("replace", dst="0.0.0.0/0", gateway=net["gateway"], oif=idx)
            for neigh in ipr.get_neighbours(ifindex=idx):
                ipr.neigh("del", ifindex=idx, dst=neigh.get_attr("NDA_DST"))
            if net.get("gateway") and net.get("gateway_mac"):
                _mac_bytes(net["gateway_mac"])  # a malformed MAC fails here, not inside netlink
                ipr.neigh("replace", ifindex=idx, dst=net["gateway"], lladdr=net["gateway_mac"],
                          state=NUD_REACHABLE)
            self.applied = _net_identity(net)

    def reconfigure(self, call: Call, req) -> None:
        """ReconfigureNetwork, the host's fallback when the handoff's ack did not come:
        pyroute2, on a thread."""
        net = {"mac": req.mac, "ipv4": req.ipv4, "prefix": req.prefix, "gateway": req.gateway}

        def apply() -> None:
            t0 = time.monotonic()
            try:
                self.apply(net)
            except Exception as exc:
                call.fail(CallError("FAILED_PRECONDITION", f"network apply failed: {exc!r}"))
                return
            call.finish(pb.ReconfigureNetworkResponse(apply_ms=(time.monotonic() - t0) * 1e3))

        threading.Thread(target=apply, name="reconfigure", daemon=True).start()


def _net_identity(net: dict) -> tuple:
    return (net["mac"], net["ipv4"], int(net["prefix"]), net.get("gateway") or None, net.get("gateway_mac"))


def _mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw
