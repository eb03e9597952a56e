"""Benchmarks: file transfer throughput over the control channel, both ways.

One fork (no network) per benchmark; each round moves one file of
``VMFORK_BENCH_FILE_MIB`` MiB (default 64) with ``vm.put`` (host -> guest, from
memory) or ``vm.get`` (guest -> host). Cleanup and checks run outside the timed
part. MiB/s is the file size over the round's median time.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from typing import Any, Iterator

import pytest

from pytest_vmfork import VM, Run, Snapshot, fork

from .conftest import env_int

FILE_MIB = env_int("VMFORK_BENCH_FILE_MIB", 64)
ROUNDS = env_int("VMFORK_BENCH_FILE_ROUNDS", 5)
GUEST_PATH = "/root/bench.bin"

pytestmark = pytest.mark.vm


@pytest.fixture
def bench_vm(vmfork_snapshot: Snapshot, bench_run: Run) -> Iterator[VM]:
    with fork(vmfork_snapshot, run=bench_run, network="none") as vm:
        yield vm


def throughput(benchmark: Any, direction: str, bench_say: Any) -> None:
    times = benchmark.stats.stats.data
    rates = sorted(FILE_MIB / t for t in times)
    info = {"kind": "file-transfer", "direction": direction, "file_mib": FILE_MIB, "rounds": len(times),
            "mib_per_s_median": round(FILE_MIB / statistics.median(times), 1),
            "mib_per_s_min": round(rates[0], 1), "mib_per_s_max": round(rates[-1], 1)}
    benchmark.extra_info.update(info)
    bench_say(f"file {direction} ({FILE_MIB} MiB, {len(times)} rounds): {info['mib_per_s_median']} MiB/s median"
              f"  (min {info['mib_per_s_min']}, max {info['mib_per_s_max']})")


def test_put_throughput_host_to_guest(benchmark: Any, bench_vm: VM, bench_say: Any) -> None:
    data = os.urandom(FILE_MIB << 20)
    want = hashlib.sha256(data).hexdigest()

    def teardown() -> None:  # untimed: check it arrived whole, free the guest's RAM for the next round
        got = bench_vm.exec(["sha256sum", GUEST_PATH], timeout=120).check().stdout.split()[0].decode()
        assert got == want
        bench_vm.exec(["rm", GUEST_PATH]).check()

    benchmark.pedantic(lambda: bench_vm.put(GUEST_PATH, data), teardown=teardown, rounds=ROUNDS)
    throughput(benchmark, "put (host -> guest)", bench_say)


def test_get_throughput_guest_to_host(benchmark: Any, bench_vm: VM, bench_say: Any) -> None:
    bench_vm.exec(f"head -c {FILE_MIB << 20} /dev/urandom > {GUEST_PATH}", timeout=120).check()
    want = bench_vm.exec(["sha256sum", GUEST_PATH], timeout=120).check().stdout.split()[0].decode()
    got: list[bytes] = []

    def target() -> None:
        got.append(bench_vm.get(GUEST_PATH))

    def teardown() -> None:
        assert hashlib.sha256(got.pop()).hexdigest() == want

    benchmark.pedantic(target, teardown=teardown, rounds=ROUNDS)
    throughput(benchmark, "get (guest -> host)", bench_say)


def test_exec_round_trip_while_a_put_streams(benchmark: Any, bench_vm: VM, bench_say: Any) -> None:
    """exec(["true"]) round trips during a big put share the one virtio-serial
    connection with it; compared with the same execs on an idle channel."""
    import threading
    import time

    def round_trips(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            bench_vm.exec(["true"]).check()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    idle = round_trips(10)
    data = os.urandom(FILE_MIB << 20)
    put = threading.Thread(target=bench_vm.put, args=(GUEST_PATH, data))
    busy: list[float] = []

    def target() -> None:
        put.start()
        while put.is_alive() and len(busy) < 200:
            busy.extend(round_trips(1))
        put.join(600)

    benchmark.pedantic(target, rounds=1)
    during = busy[:-1] or busy  # the last one may have started after the put ended
    info = {"kind": "exec-during-put", "idle_ms_median": round(statistics.median(idle), 1),
            "busy_ms_median": round(statistics.median(during), 1), "busy_ms_max": round(max(during), 1),
            "execs_during_put": len(during)}
    benchmark.extra_info.update(info)
    bench_say(f"exec round trip: idle p50 {info['idle_ms_median']} ms; during a {FILE_MIB} MiB put"
              f" p50 {info['busy_ms_median']} ms, max {info['busy_ms_max']} ms ({len(during)} execs)")
