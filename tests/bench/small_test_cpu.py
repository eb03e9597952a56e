"""What a small test costs, for comparing two checkouts (README "Measured"):

    python tests/bench/small_test_cpu.py CACHE_DIR FORKS LABEL

prints one JSON line with, for FORKS library forks of the stock template with one
mailbox (no network): the CPU of one small test (fork + 4 commands + close: the
fork's QEMU from /proc/<pid>/stat just before close, and this process's own CPU),
the steady ``exec(["true"])`` against the guest shell's own spawn of /bin/true, and
put / get throughput of a 32 MiB file. Written against the API both the old and the
new checkout have (SnapshotStore.get, fork, vm.exec/put/get/pid), so the same script
measures both; run the two checkouts in alternating blocks on one machine.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from pytest_vmfork import Run, SnapshotStore, Template, fork

COMMANDS = (["true"], ["echo", "hi"], ["cat", "/etc/hostname"], ["sh", "-c", "exit 0"])
TICK = os.sysconf("SC_CLK_TCK")
FILE_MIB = 32
#: The guest shell's own spawn of /bin/true, in microseconds per program.
SHELL_SPAWN = ("i=0; s=$(date +%s%N); while [ $i -lt 50 ]; do /bin/true; i=$((i+1)); done; "
               "e=$(date +%s%N); echo $(( (e - s) / 50000 ))")
TEMPLATE = Template(mailboxes=["app-config"])


def qemu_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def small_test(snap: Any, run: Run, n: int) -> tuple[float, float, float]:
    """(QEMU CPU s, host CPU s, wall s) of fork + 4 commands + close."""
    t0, c0 = time.monotonic(), time.process_time()
    vm = fork(snap, run=run, mailboxes={"app-config": {"n": n}})
    try:
        for argv in COMMANDS:
            assert vm.exec(argv).returncode == 0
        qemu = qemu_cpu_s(vm.pid)
    finally:
        vm.close()
    return qemu, time.process_time() - c0, time.monotonic() - t0


def steady_exec(vm: Any) -> dict[str, float]:
    """A running fork's ``exec(["true"])`` (after five warm-up ones) against the
    guest shell's own spawn of /bin/true, ms."""
    for _ in range(5):
        vm.exec(["true"])
    times = []
    for _ in range(30):
        t = time.monotonic()
        vm.exec(["true"])
        times.append((time.monotonic() - t) * 1000)
    shell_us = [int(vm.exec(["sh", "-c", SHELL_SPAWN]).stdout) for _ in range(3)]
    return {"exec_true_p50_ms": round(statistics.median(times), 2),
            "shell_spawn_true_ms": round(statistics.median(shell_us) / 1000, 2)}


def transfer(vm: Any) -> dict[str, float]:
    """put and get of a FILE_MIB MiB file, MiB/s."""
    data = os.urandom(FILE_MIB << 20)
    t = time.monotonic()
    vm.put("/root/bench.bin", data, timeout=600)
    put_s = time.monotonic() - t
    t = time.monotonic()
    back = vm.get("/root/bench.bin", timeout=600)
    get_s = time.monotonic() - t
    assert back == data
    return {"put_mib_s": round(FILE_MIB / put_s, 1), "get_mib_s": round(FILE_MIB / get_s, 1)}


def main() -> None:
    cache, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    run = Run()
    try:
        snap = SnapshotStore(cache).get(TEMPLATE, run=run)
        small_test(snap, run, -1)  # page the snapshot in: not counted
        rows = [small_test(snap, run, i) for i in range(n)]
        with fork(snap, run=run) as vm:
            extra = {**steady_exec(vm), **transfer(vm)}
    finally:
        run.remove()
    qemu, host, wall = (sorted(r[k] for r in rows) for k in range(3))
    print(json.dumps({"label": label, "forks": n, "load": round(os.getloadavg()[0], 1),
                      "qemu_cpu_s_p50": round(statistics.median(qemu), 3),
                      "host_cpu_s_p50": round(statistics.median(host), 3),
                      "cpu_per_test_s_p50": round(statistics.median(q + h for q, h, _ in rows), 3),
                      "wall_s_p50": round(statistics.median(wall), 3), **extra}))


if __name__ == "__main__":
    main()
