"""The warm pool's pre-warmed forks, and what a test waits for: the fork, then its first command."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Iterator

import pytest

from pytest_vmfork import Run, fork
from pytest_vmfork.net import network as nw
from pytest_vmfork.vm.pool import WarmPool

from .test_network import guest_eth0

RANDOM = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"


@pytest.fixture
def pool_net(tmp_path: Path) -> Iterator[tuple[nw.RunNetwork, Run]]:
    """A run network of its own, so the pool's leases are this test's alone."""
    run = Run(run_id=f"pooltest-{secrets.token_hex(4)}")
    net = nw.RunNetwork(run.run_id, pool="10.216.40.0/22", lease_root=tmp_path / "leases").up()
    try:
        yield net, run
    finally:
        net.down()
        run.remove()


def test_first_exec_is_timed_once_and_split_into_stages(vmfork_snapshot):
    with fork(vmfork_snapshot) as vm:
        first_exec_timings(vm)


def first_exec_timings(vm) -> None:
    assert "first_exec_ms" not in vm.timings
    vm.exec(["true"])
    t = dict(vm.timings)
    vm.exec(["true"])
    assert vm.timings["first_exec_ms"] == t["first_exec_ms"] > 0  # the second exec does not overwrite it
    stages = t["first_exec"]
    assert set(stages) == {"rpc_ms", "spawn_ms", "run_ms"}
    assert all(v >= 0 for v in stages.values()) and stages["spawn_ms"] > 0
    assert sum(stages.values()) == pytest.approx(t["first_exec_ms"], abs=0.1)


def test_a_prewarmed_pool_fork_has_its_own_payload_generation_entropy_and_network(vmfork_snapshot, pool_net):
    net, run = pool_net
    pool = WarmPool(vmfork_snapshot, run, net, size=1)
    try:
        # The pool is still pre-warming its first fork: the request waits for it, not a cold fork.
        a = fork(vmfork_snapshot, run=run, network=net, pool=pool, mailboxes={"app-config": {"n": 1}})
        with a:
            t = a.timings
            assert t["pooled"] is True and t["prewarmed"] is True and t["pool_wait_ms"] >= 0, t
            assert t["prepare_ms"] > 0 and t["spawn_ms"] == t["load_ms"] == 0.0
            assert t["handoff_path"] == "ack" and t["guest_apply"] == "unchanged", t
            assert a.read_mailbox("app-config") == {"n": 1}
            assert a.agent.health().generation == a.generation
            assert guest_eth0(a) == (a.mac.lower(), [f"{a.ip}/{net.subnet.prefixlen}"])
            assert abs(int(a.exec(["date", "+%s"]).stdout) - time.time()) < 10
            b = fork(vmfork_snapshot, run=run, network=net, pool=pool, mailboxes={"app-config": {"n": 2}})
            with b:
                assert b.timings["prewarmed"] is True
                assert b.read_mailbox("app-config") == {"n": 2}
                assert (b.ip, b.mac, b.generation) != (a.ip, a.mac, a.generation)
                assert a.exec(RANDOM).stdout != b.exec(RANDOM).stdout
                assert guest_eth0(b) == (b.mac.lower(), [f"{b.ip}/{net.subnet.prefixlen}"])
    finally:
        pool.close()
    assert pool.failures == 0 and pool.last_error is None


def test_a_pool_fork_without_a_payload_has_no_mailbox_file(vmfork_snapshot, pool_net):
    net, run = pool_net
    pool = WarmPool(vmfork_snapshot, run, net, size=1)
    try:
        with fork(vmfork_snapshot, run=run, network=net, pool=pool) as vm:
            assert vm.timings["prewarmed"] is True
            assert vm.read_mailbox("app-config") is None
            assert vm.exec(["test", "-e", "/run/vmfork/mailbox/app-config.json"]).returncode == 1
    finally:
        pool.close()
