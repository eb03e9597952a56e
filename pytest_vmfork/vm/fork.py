"""Forks: restore a VM from a snapshot in a fraction of a second.

:func:`fork` checks the request, takes a pre-warmed engine from a warm pool (or
starts a cold one), runs its restore (pytest_vmfork.vm.restore: prepare, then the
one resume) and hands back the public :class:`~pytest_vmfork.vm.handle.VM`. On any
failure the half-started fork is torn down before the error propagates.

``VM``, ``MailboxPayload`` and ``Network`` are re-exported here: they were
imported from this module before it was split (plugin, scripts, tests).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Protocol

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host.run import Run
from pytest_vmfork.vm.handle import VM
from pytest_vmfork.vm.payloads import MailboxPayload, prepare_mailboxes
from pytest_vmfork.vm.restore import DEFAULT_HANDOFF_TIMEOUT, DEFAULT_READY_TIMEOUT, ForkEngine, Network
from pytest_vmfork.vm.snapshot import Snapshot
from pytest_vmfork.vm.state import VMState

__all__ = ["DEFAULT_HANDOFF_TIMEOUT", "DEFAULT_READY_TIMEOUT", "VM", "MailboxPayload", "Network", "Pool", "fork"]


class Pool(Protocol):
    """Where :func:`fork` takes an engine prepared ahead of the request
    (pytest_vmfork.vm.pool.WarmPool): restored and pre-warmed, or None."""

    def take(self, snapshot: Snapshot, network: Network) -> ForkEngine | None: ...


def fork(
    snapshot: Snapshot,
    *,
    run: Run | None = None,
    mailboxes: Mapping[str, Any] | None = None,
    network: Network = None,
    ready_timeout: float = DEFAULT_READY_TIMEOUT,
    handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT,
    pool: Pool | None = None,
) -> VM:
    """Restore a new VM from ``snapshot`` and return it once the guest is ready.

    ``mailboxes`` maps names the snapshot offers to JSON objects (or
    MailboxPayload). ``network`` is "none" (default), "user" or a RunNetwork
    that is up. With a ``pool`` (a WarmPool of this snapshot and network) the
    fork starts from a QEMU the pool restored and pre-warmed ahead of the
    request (see :meth:`ForkEngine.prewarm`), when it has one ready. The returned
    VM must be closed (``with fork(snap) as vm: ...``); on any failure the
    half-started fork is torn down before the error propagates.
    """
    t0 = time.monotonic()
    for name, value, upper in (("ready_timeout", ready_timeout, 600), ("handoff_timeout", handoff_timeout, 60)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
            raise ConfigError(f"{name}={value!r}: use seconds greater than 0 and at most {upper}")
    payloads, acks = prepare_mailboxes(snapshot, mailboxes)
    if acks and (network is None or network == "none"):
        raise ConfigError(
            f"mailbox {next(iter(acks))!r} waits for an ack, but acks travel over UDP and this fork "
            "has no network; use --vmfork-network=tap or user"
        )
    engine = pool.take(snapshot, network) if pool is not None else None
    if engine is not None:  # restored before the request: those stages cost it nothing
        engine.timings = {"pooled": True, "prewarmed": engine.state is VMState.RUNNING,
                          "prepare_ms": engine.timings.get("prepare_ms", engine.timings["load_ms"]),
                          "pool_wait_ms": engine.timings.get("pool_wait_ms", 0.0), "spawn_ms": 0.0, "load_ms": 0.0}
    else:
        own_run = run is None
        run = run or Run()
        name, workdir = run.new_vm_dir("f")
        engine = ForkEngine(name, snapshot, run, workdir, own_run=own_run)
    vm = VM(engine)
    try:
        if engine.state is VMState.STARTING:
            engine.prepare(network)
        engine.resume(payloads, acks=acks, ready_timeout=ready_timeout, handoff_timeout=handoff_timeout, since=t0)
    except BaseException:
        console = vm.console_tail()
        vm.close()
        vm.timings["console_tail"] = console
        raise
    return vm
