"""Sweeps network links of ours (by name: ``vmt…`` TAPs, ``vmb…`` bridges) that
nothing uses any more: a persistent TAP no process holds, a bridge whose lease is
stale (:mod:`pytest_vmfork.janitor.leases` asks :func:`delete_bridge`), and, only with
``orphan_links``, a bridge no lease names and no port is attached to (its run may use
another lease root). A TAP a QEMU holds goes with that QEMU. Links are listed from
sysfs and deleted through netlink; ``link_names`` bounds what may be touched."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pytest_vmfork.janitor.sweep import Sweep
from pytest_vmfork.net import subnets


def host_links() -> dict[str, str | None]:
    """Every interface: name -> kind ("bridge", "tun" or None), from sysfs
    (a netlink dump costs the pyroute2 import; deleting uses netlink)."""
    out: dict[str, str | None] = {}
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return out
    for name in names:
        base = f"/sys/class/net/{name}"
        out[name] = ("bridge" if os.path.isdir(f"{base}/bridge") else
                     "tun" if os.path.exists(f"{base}/tun_flags") else None)
    return out


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except (OSError, ValueError):
        return None


def _delete_link_index(index: int | None) -> bool:
    """Delete the interface with this index; False if there is none."""
    if index is None:
        return False
    from pytest_vmfork.net.netlink import iproute, netlink_code, off_loop

    def run() -> bool:
        with iproute() as ipr:
            try:
                ipr.link("del", index=index)
            except Exception as exc:
                if netlink_code(exc) == errno.ENODEV:
                    return False
                raise
        return True

    return off_loop(run)


def _bridge_ports(name: str) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/class/net/{name}/brif"))
    except OSError:
        return []


def _tun_holders() -> dict[str, list[int]]:
    """TAP name -> PIDs holding a /dev/net/tun fd attached to it (fdinfo ``iff:``)."""
    out: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") != "/dev/net/tun":
                    continue
                info = Path(f"/proc/{entry}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            for line in info.splitlines():
                if line.startswith("iff:"):
                    out.setdefault(line.split(":", 1)[1].strip(), []).append(int(entry))
    return out


def delete_bridge(sw: Sweep, name: str, reason: str) -> bool:
    """Delete bridge ``name`` (report it in a dry run); False if ``name`` is a
    device of another kind (left alone). Raises if netlink fails."""
    from pytest_vmfork.net.network import delete_link

    kind = host_links().get(name)
    if kind is None:
        return True  # already gone
    if kind != "bridge":
        sw.report.skip("bridge", name, f"{reason}, but it is a {kind or 'non-bridge'} device")
        return False
    if sw.dry_run or delete_link(name):
        sw.report.remove("bridge", name, reason)
    return True


def sweep(sw: Sweep) -> None:
    """Remove TAPs nobody holds and (``orphan_links``) bridges no lease names."""
    links = host_links()
    wanted = {n: k for n, k in links.items()
              if (sw.link_names is None or n in sw.link_names)
              and ((k == "tun" and subnets.is_tap_name(n)) or (k == "bridge" and subnets.is_bridge_name(n)))}
    if not wanted:
        return
    indexes = {n: _ifindex(n) for n, k in wanted.items() if k == "tun"}
    holders = _tun_holders() if indexes else {}
    killed = {q.pid for q in sw.qemus if q.orphan is not None}
    for name, kind in sorted(wanted.items()):
        sw.check_time()
        if kind == "tun":
            held_by = holders.get(name, [])
            if any(p not in killed for p in held_by):
                continue  # a live process holds it: it goes with that process
            if held_by:  # non-persistent: it goes with the QEMU killed above
                if sw.dry_run:
                    sw.report.remove("tap", name, "it goes with its orphaned QEMU")
                continue
            reason = "no process holds it (a persistent TAP nobody uses)"
            try:
                # by the index seen before the holder scan: a TAP of that name made
                # since (a new fork reusing the name) has another index and stays
                if sw.dry_run or _delete_link_index(indexes.get(name)):
                    sw.report.remove("tap", name, reason)
            except Exception as exc:
                sw.report.skip("tap", name, f"{reason}, but deleting it failed: {exc}")
            continue
        if name in sw.lease_bridges or name in sw.report.reported("bridge"):
            continue  # a lease accounts for it (stale ones were handled above)
        ports = _bridge_ports(name)
        if not sw.orphan_links:
            sw.report.skip("bridge", name,
                           f"no lease under {sw.lease_root} names it (it may belong to a run with "
                           "another lease dir); remove it with `vmfork gc --orphan-links`")
            continue
        if ports:
            sw.report.skip("bridge", name, f"no lease names it, but ports {ports} are attached")
            continue
        try:
            delete_bridge(sw, name, f"no lease under {sw.lease_root} names it and no port is attached")
        except Exception as exc:
            sw.report.skip("bridge", name, f"deleting it failed: {exc}")
