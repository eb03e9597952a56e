"""What a test waits for (fork + first exec) with the pre-warmed pool, with the pool as
it was before (QEMU spawned and device state loaded ahead, resumed at the request) and
without a pool, in alternating blocks (docs/performance.md, "Restore and time to first result"):

    PYTHONPATH=. .venv/bin/python tests/bench/pool_ab.py CACHE_DIR FORKS ROUNDS WORK_S

Each block forks FORKS + 1 VMs of the test template one after another (TAP handoff,
one mailbox payload), times the fork and the first ``exec(["true"])``, then runs
``sleep WORK_S`` in the guest as the test's own work; the first fork of a block is
not counted (its pool is still empty). Needs root (TAP).
"""
import os
import statistics
import sys
import time

from fixtures.templates import TEST_TEMPLATE
from pytest_vmfork import Run, SnapshotStore, fork
from pytest_vmfork.config import Settings
from pytest_vmfork.net.network import RunNetwork
from pytest_vmfork.vm.pool import WarmPool
from pytest_vmfork.vm.restore import ForkEngine

MODES = ("prewarm", "loaded", "nopool")
PREWARM = ForkEngine.prewarm


def block(cache: str, mode: str, n: int, work_s: float) -> list[tuple[float, float, float]]:
    """(restore-to-healthy, first exec, fork + first exec) ms of ``n`` forks."""
    ForkEngine.prewarm = PREWARM if mode == "prewarm" else (lambda self, *a: None)  # "loaded": the old pool
    run, settings = Run(), Settings()
    net = RunNetwork(run.run_id, pool=settings.subnet_pool, lease_root=settings.lease_dir).up()
    rows = []
    try:
        snap = SnapshotStore(cache).get(TEST_TEMPLATE, run=run)
        pool = WarmPool(snap, run, net, size=1) if mode != "nopool" else None
        try:
            for i in range(n + 1):
                t0 = time.monotonic()
                with fork(snap, run=run, network=net, pool=pool, mailboxes={"app-config": {"i": i}}) as vm:
                    vm.exec(["true"])
                    total = (time.monotonic() - t0) * 1000
                    if i:
                        rows.append((vm.timings["restore_to_healthy_ms"], vm.timings["first_exec_ms"], total))
                    if work_s:
                        vm.exec(["sleep", str(work_s)])
        finally:
            if pool is not None:
                pool.close()
    finally:
        net.down()
        run.remove()
    return rows


def main() -> None:
    cache, n, rounds, work_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES:
            results[mode] += block(cache, mode, n, work_s)
            print(f"round {r} {mode} done, load {os.getloadavg()[0]:.1f}", flush=True)
    for mode, rows in results.items():
        def p(k: int) -> str:
            values = sorted(row[k] for row in rows)
            return f"{statistics.median(values):.0f}/{values[int(0.95 * (len(values) - 1))]:.0f}"
        print(f"{mode:8s} n={len(rows)}  p50/p95 ms: restore-to-healthy {p(0)}  first exec {p(1)}  "
              f"fork + first exec {p(2)}")


if __name__ == "__main__":
    main()
