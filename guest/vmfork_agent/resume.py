"""What a fork does when it runs: the resume sequence after the doorbell.

The host queues one doorbell byte before the vCPUs resume; the loop (server.py)
calls :func:`on_resume`, which takes the new generation from the system mailbox,
starts the channel's new session, reseeds randomness, sets the clock, applies the
network (network.py) and acks it, delivers the user mailboxes, then reports ready.
This runs under TCG in a freshly restored QEMU that translates every guest
instruction again, so it stays short: no imports, no logging to the console before
the ready event, plain system calls, objects built at boot.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import TYPE_CHECKING

from vmfork_agent.boot import log
from vmfork_agent.files import write_all
from vmfork_agent.mailboxes import GuestMailbox

from pytest_vmfork import mailbox as mbx

if TYPE_CHECKING:
    from vmfork_agent.server import Agent

RUN_DIR = "/run/vmfork"
MAILBOX_DIR = RUN_DIR + "/mailbox"
RNDRESEEDCRNG = 0x5207


def on_resume(agent: Agent) -> None:
    """The doorbell rang: a fork (or the same VM resumed as a new generation).
    Each stage's end is stamped (ms since the doorbell) and reported in the ready event."""
    t0 = time.monotonic()
    marks = []
    got = agent.system.take()
    if got is None:
        agent.emit(event="error", stage="resume", detail="no-new-generation")
        return
    cfg = json.loads(got.data)
    agent.generation = int(cfg["gen"])
    agent.token = cfg.get("token", "")
    marks.append(("gen", time.monotonic()))
    session = int(cfg.get("chan", 0))
    if session and session != agent.session:
        agent.reset_session(session)
        marks.append(("chan", time.monotonic()))
    entropy = bytes.fromhex(cfg["entropy"])
    os.write(agent.urandom, entropy)
    fcntl.ioctl(agent.urandom, RNDRESEEDCRNG)  # (the agent itself draws on os.urandom only)
    marks.append(("entropy", time.monotonic()))
    if "time_ns" in cfg:
        time.clock_settime_ns(time.CLOCK_REALTIME, int(cfg["time_ns"]))
        marks.append(("clock", time.monotonic()))
    net = cfg.get("net")
    if net:
        try:
            path = agent.network.apply_on_resume(net, marks)
            ack(agent, net, mailbox=mbx.SYSTEM_MAILBOX, ip=net["ipv4"], path=path)
            marks.append(("ack", time.monotonic()))
        except Exception as exc:  # no ack: the host falls back to ReconfigureNetwork
            log(f"network handoff failed: {exc!r}")
    acks = cfg.get("acks", {})
    for mb in agent.user.values():
        delivery = mb.take()
        if delivery is not None:
            deliver(agent, mb, delivery, acks.get(mb.name), net)
    marks.append(("mailboxes", time.monotonic()))
    stages = ",".join(f"{name}:{(t - t0) * 1e3:.2f}" for name, t in marks)
    agent.emit(event="ready", gen=agent.generation, resume_ms=f"{(time.monotonic() - t0) * 1e3:.2f}",
               stages=stages)
    log(f"resumed as fork generation {agent.generation}")  # after the signal: off the hot path


def deliver(agent: Agent, mb: GuestMailbox, delivery: mbx.Delivery, ack: str | None,
            net: dict | None) -> None:
    """Publish a payload at /run/vmfork/mailbox/<name>.json (atomically).

    ``ack`` is "agent" (acknowledge on delivery), "guest" (a guest program
    acknowledges when it has applied the payload: it sends the datagram
    written to <name>.ack, e.g. with ``vmfork-ack <name>``) or None.
    """
    mb.payload = delivery.data
    mb.generation = agent.generation
    path = f"{MAILBOX_DIR}/{mb.name}.json"
    _atomic_write(path, delivery.data)
    if ack and net:
        datagram = mbx.format_ack(stage="applied", mailbox=mb.name, gen=agent.generation, token=agent.token)
        if ack == "guest":
            _atomic_write(f"{MAILBOX_DIR}/{mb.name}.ack",
                          f"{net['ack_host']} {net['ack_port']} ".encode() + datagram + b"\n")
        else:
            agent.udp.sendto(datagram, (net["ack_host"], int(net["ack_port"])))


def ack(agent: Agent, net: dict, **fields: object) -> None:
    """The network handoff's ack: one UDP datagram to the host's ack listener."""
    datagram = mbx.format_ack(stage="applied", gen=agent.generation, token=agent.token, **fields)
    agent.udp.sendto(datagram, (net["ack_host"], int(net["ack_port"])))


def _atomic_write(path: str, data: bytes) -> None:
    """Write beside ``path`` and rename over it; plain system calls, no io objects
    (on the resume path every code path not yet run costs TCG translation)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, path)
