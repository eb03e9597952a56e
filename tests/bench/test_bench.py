"""Benchmarks: fork restore-to-healthy, template cold boot, forks/s, memory per fork.

Run with ``make bench`` (see conftest.py for the knobs); ``tests/bench/report.py``
turns the saved JSON into a table and an SVG histogram. Every figure that is
not a pytest-benchmark timing goes into ``benchmark.extra_info`` so it lands in
the JSON: per-round ``vm.timings``-derived stage medians, the cold boot / restore
ratio, forks/s, PSS.

Forks are closed outside the timed part (pedantic ``teardown``), so every
round times exactly one ``fork()`` call from a fresh QEMU to a healthy guest.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import queue
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import pytest

from pytest_vmfork import Run, Snapshot, SnapshotStore, Template, fork
from pytest_vmfork.net.network import RunNetwork
from pytest_vmfork.plugin import SESSION_KEY
from pytest_vmfork.vm import vmm
from pytest_vmfork.vm.layer import discard

from . import forkmem, small_test_cpu, suite_ab, tcg_split
from .conftest import env_int

ROUNDS = env_int("VMFORK_BENCH_ROUNDS", 20)
WARMUP_ROUNDS = 1
COLD_ROUNDS = env_int("VMFORK_BENCH_COLD_ROUNDS", 3)
FORK_WORKERS = 2
FORKS_PER_WORKER = env_int("VMFORK_BENCH_FORKS_PER_WORKER", 8)
SNAPSHOT_ROUNDS = env_int("VMFORK_BENCH_SNAPSHOT_ROUNDS", 5)
MEMORY_COUNTS = sorted({int(n) for n in os.environ.get("VMFORK_BENCH_MEMORY_COUNTS", "1,10,20").split(",")})
MAILBOX = "app-config"
QEMU = "qemu-system-x86_64"
TCG_STAGES = ("ready", "first_exec", "second_exec")
#: Blocks the log of a paused fork may differ from `info jit` by before it counts as lost.
TCG_SPLIT_SLACK = 5

pytestmark = pytest.mark.vm


# --- small helpers ------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (the plugin's summary uses the same rule)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "p50": round(statistics.median(values), 2),
        "p95": round(percentile(values, 0.95), 2),
        "max": round(max(values), 2),
    }


def stage_breakdown(
    timings: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Median of every numeric stage of ``vm.timings`` and counts of the labels
    (handoff_path, guest_apply, mailbox_path)."""
    numbers: dict[str, list[float]] = {}
    labels: dict[str, Counter[str]] = {}
    for t in timings:
        for key, value in t.items():
            if key == "console_tail" or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                if math.isfinite(value):
                    numbers.setdefault(key, []).append(float(value))
            elif isinstance(value, str):
                labels.setdefault(key, Counter())[value] += 1
            elif isinstance(value, Mapping):  # ack_ms: {mailbox: ms}
                for sub, ms in value.items():
                    if isinstance(ms, (int, float)) and math.isfinite(ms):
                        numbers.setdefault(f"{key}.{sub}", []).append(float(ms))
    medians = {key: round(statistics.median(vals), 2) for key, vals in numbers.items()}
    return medians, {key: dict(counts) for key, counts in labels.items()}


def qemu_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
            except OSError:
                continue
            if os.path.basename(argv0) == QEMU.encode():
                pids.append(int(entry.name))
    return pids


def host_state() -> dict[str, Any]:
    """How busy the machine was: other engineers' tests share it."""
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "qemu_processes": len(qemu_pids())}


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def mappers_of(path: Path) -> list[int]:
    """QEMU processes (anyone's) whose command line names ``path``: they share its page-cache pages."""
    needle = str(path).encode()
    found = []
    for pid in qemu_pids():
        try:
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def mib(kib: float) -> float:
    return round(kib / 1024, 1)


# --- 1 + 2: restore to healthy --------------------------------------------------


def bench_restore(
    benchmark: Any, snap: Snapshot, run: Run, *, network: Any, with_payload: bool
) -> dict[str, Any]:
    """One fresh fork of ``snap`` (a template's or a layer) per round."""
    """One fresh fork per round; the fork is verified and closed in the untimed teardown."""
    timings: list[dict[str, Any]] = []
    counter = iter(range(1_000_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        mail = {MAILBOX: {"bench": "restore", "round": next(counter)}} if with_payload else None
        return ([], mail), {}

    def target(box: list[Any], mail: dict[str, Any] | None) -> None:
        box.append(fork(snap, run=run, network=network, mailboxes=mail))

    def teardown(box: list[Any], mail: dict[str, Any] | None) -> None:
        vm = box[0]
        try:
            timings.append(dict(vm.timings))
            if mail is not None:
                assert vm.read_mailbox(MAILBOX) == mail[MAILBOX], "the payload did not arrive"
            if isinstance(network, RunNetwork):
                assert vm.timings.get("handoff_path") in ("ack", "ctl-fallback"), vm.timings
        finally:
            vm.close()

    before = host_state()
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    measured = timings[WARMUP_ROUNDS:]
    restore = [t["restore_to_healthy_ms"] for t in measured]
    stages, labels = stage_breakdown(measured)
    info = {
        "kind": "restore",
        "snapshot": f"layer (depth {snap.depth})" if snap.depth else "template",
        "network": "tap" if isinstance(network, RunNetwork) else str(network),
        "mailbox_payload": with_payload,
        "rounds": len(measured),
        "warmup_rounds": WARMUP_ROUNDS,
        "restore_to_healthy_ms": restore,
        "restore_to_healthy": summary_ms(restore),
        "stages_median_ms": stages,
        "labels": labels,
        "host_before": before,
        "host_after": host_state(),
    }
    benchmark.extra_info.update(info)
    return info


def test_restore_to_healthy_tap_and_mailbox(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_network: RunNetwork,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """A fork with a TAP on the run's bridge (network handoff) and one mailbox payload."""
    assert MAILBOX in vmfork_snapshot.mailboxes
    info = bench_restore(benchmark, vmfork_snapshot, bench_run, network=bench_network, with_payload=True)
    bench_results["restore_tap"] = info["restore_to_healthy"]
    s, st = info["restore_to_healthy"], info["stages_median_ms"]
    bench_say(
        f"restore (tap + mailbox): p50 {s['p50']:.0f} ms  p95 {s['p95']:.0f} ms  max {s['max']:.0f} ms"
        f"  [handoff {st.get('handoff_ms', float('nan')):.0f} ms median;"
        f" paths {info['labels'].get('handoff_path')}]"
    )
    guest = {k.removeprefix("guest_stages."): v for k, v in st.items() if k.startswith("guest_stages.")}
    bench_say(
        f"restore (tap + mailbox), the guest's resume: woken {st.get('guest_wake_ms', float('nan')):.0f} ms after"
        f" cont, then (ms since the doorbell, medians) "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(guest.items(), key=lambda kv: kv[1]))
    )


def test_restore_to_healthy_no_network(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """The bare restore: no NIC backend, no payload."""
    info = bench_restore(benchmark, vmfork_snapshot, bench_run, network="none", with_payload=False)
    bench_results["restore_none"] = info["restore_to_healthy"]
    s = info["restore_to_healthy"]
    bench_say(
        f"restore (no network, no payload): p50 {s['p50']:.0f} ms  p95 {s['p95']:.0f} ms"
        f"  max {s['max']:.0f} ms"
    )


# --- 2b: what a test waits for: the fork, then its first command ------------------

#: Seconds of "the test's own work" between rounds of the plugin series: 0 is a
#: suite of back-to-back trivial tests (the pool's worst case), 1 a test that
#: exercises its VM for a second (a command runs in the guest meanwhile).
TEST_WORK_S = (0.0, 1.0)


def first_result_info(timings: Sequence[Mapping[str, Any]], totals: Sequence[float], *, path: str,
                      work_s: float | None) -> dict[str, Any]:
    stages, labels = stage_breakdown(timings)
    return {
        "kind": "first_result",
        "path": path,
        "network": "tap",
        "mailbox_payload": True,
        "test_work_s": work_s,
        "rounds": len(totals),
        "fork_first_exec_ms": list(totals),
        "fork_first_exec": summary_ms(totals),
        "restore_to_healthy": summary_ms([t["restore_to_healthy_ms"] for t in timings]),
        "first_exec": summary_ms([t["first_exec_ms"] for t in timings]),
        "prewarmed": sum(bool(t.get("prewarmed")) for t in timings),
        "stages_median_ms": stages,
        "labels": labels,
    }


def say_first_result(bench_say: Any, name: str, info: dict[str, Any]) -> None:
    f, r, e, st = info["fork_first_exec"], info["restore_to_healthy"], info["first_exec"], info["stages_median_ms"]
    bench_say(
        f"fork + first exec, {name}: p50 {f['p50']:.0f} ms  p95 {f['p95']:.0f} ms"
        f"  (restore-to-healthy p50 {r['p50']:.0f}, first exec p50 {e['p50']:.0f}: "
        f"rpc {st.get('first_exec.rpc_ms', 0):.0f} + spawn "
        f"{st.get('first_exec.spawn_ms', 0):.0f} + run {st.get('first_exec.run_ms', 0):.0f} ms;"
        f" {info['prewarmed']}/{info['rounds']} pre-warmed)"
    )


def test_fork_and_first_exec_library(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_network: RunNetwork,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """``fork()`` (no pool) with a TAP handoff and one payload, then ``vm.exec(["true"])``:
    a library user's wait for a first result, every guest code path cold."""
    timings: list[dict[str, Any]] = []
    totals: list[float] = []
    counter = iter(range(1_000_000))

    def target() -> Any:
        t0 = time.monotonic()
        vm = fork(vmfork_snapshot, run=bench_run, network=bench_network,
                  mailboxes={MAILBOX: {"bench": "first-exec", "round": next(counter)}})
        try:
            assert vm.exec(["true"]).returncode == 0
        finally:
            totals.append((time.monotonic() - t0) * 1000)
            timings.append(dict(vm.timings))
            vm.close()  # inside the round: nothing else runs between rounds

    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    info = first_result_info(timings[WARMUP_ROUNDS:], totals[WARMUP_ROUNDS:], path="library, pool off",
                             work_s=None)
    info["host_after"] = host_state()
    benchmark.extra_info.update(info)
    bench_results["first_result_library"] = info["fork_first_exec"]
    say_first_result(bench_say, "library (pool off)", info)


@pytest.mark.parametrize("work_s", TEST_WORK_S)
def test_fork_and_first_exec_plugin_pool(
    benchmark: Any,
    work_s: float,
    request: pytest.FixtureRequest,
    vmfork_snapshot: Snapshot,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """The ``vm`` fixture's path (the plugin session's fork, warm pool, TAP handoff,
    one payload) then ``vm.exec(["true"])``; between rounds the test's own work
    (``work_s`` of a guest ``sleep``, untimed) and the fixture's teardown."""
    session = request.config.stash[SESSION_KEY]
    if not session.settings.pool_size:
        pytest.skip("the warm pool is off (vmfork_pool_size = 0)")
    timings: list[dict[str, Any]] = []
    counter = iter(range(1_000_000))

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([],), {}

    def target(box: list[Any]) -> None:
        box.append(session.fork(vmfork_snapshot, {MAILBOX: {"bench": "plugin", "round": next(counter)}}))
        assert box[0].exec(["true"]).returncode == 0

    def teardown(box: list[Any]) -> None:
        if not box:
            return
        vm = box[0]
        try:
            timings.append(dict(vm.timings))
            if work_s:
                vm.exec(["sleep", str(work_s)])
        finally:
            session.release(vm, False)

    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    measured = timings[WARMUP_ROUNDS:]
    totals = [t["restore_to_healthy_ms"] + t["first_exec_ms"] for t in measured]
    info = first_result_info(measured, totals, path="plugin, warm pool", work_s=work_s)
    info["host_after"] = host_state()
    benchmark.extra_info.update(info)
    bench_results[f"first_result_plugin_{work_s:g}s"] = info["fork_first_exec"]
    say_first_result(bench_say, f"plugin with its pool, tests of {work_s:g} s", info)


def translated_blocks(vm: Any) -> int:
    """TCG translation blocks this fork's QEMU has made so far (HMP ``info jit``):
    how much guest code the fork has run for the first time."""
    stats = forkmem.tcg_stats(vm)
    if "tbs" not in stats:
        raise AssertionError(f"no TB count in `info jit`: {stats!r}")
    return stats["tbs"]


@contextlib.contextmanager
def paused(vm: Any) -> Iterator[None]:
    """The guest stopped (QMP ``stop`` returns once the vCPU is out of guest code): a
    stage boundary every count agrees on. A fork's agent runs on for a few ms after it
    reports ready, translating up to a few hundred blocks during an `info jit` round trip."""
    qemu = vm.engine.qemu  # the benchmark's view into the VM's QEMU, as forkmem.tcg_stats
    qemu.cmd("stop")
    try:
        yield
    finally:
        qemu.cmd("cont")


def split_lag(row: Mapping[str, int], split: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """Per stage boundary, the blocks `info jit` counted so far that the log had not:
    the running totals of ``row`` (new blocks per stage) less those of ``split``."""
    jit = logged = 0
    out = {}
    for stage in TCG_STAGES:
        jit += row[stage]
        logged += sum(split[stage].values())
        out[stage] = jit - logged
    return out


def test_translated_blocks_per_stage(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_network: RunNetwork,
    bench_say: Any,
) -> None:
    """The cost model under TCG: every fork's QEMU translates each guest code path the
    first time it runs. Counts new translation blocks per stage of a cold fork
    (ready, first exec, second exec), and of a pool fork after its pre-warm; the cold
    fork's are also split by guest address into the kernel's and user space's
    (tests/bench/tcg_split.py), checked against `info jit`'s counts."""
    if vmfork_snapshot.machine.accel != "tcg":
        pytest.skip("translation blocks exist under TCG only")
    from pytest_vmfork.vm.pool import WarmPool

    rows: list[dict[str, int]] = []
    splits: list[dict[str, dict[str, int]]] = []

    def stages(vm: Any, sizes: list[int] | None = None) -> dict[str, int]:
        totals = []
        for stage in TCG_STAGES:
            if stage != "ready":
                vm.exec(["true"])
            with paused(vm):
                if sizes is not None:
                    sizes.append(tcg_split.log_size(vm))
                totals.append(translated_blocks(vm))
        return {stage: now - before for stage, now, before in zip(TCG_STAGES, totals, [0, *totals])}

    def round_() -> None:
        sizes: list[int] = []
        with tcg_split.logging_blocks(), fork(vmfork_snapshot, run=bench_run, network=bench_network,
                                              mailboxes={MAILBOX: {"tb": 1}}) as vm:
            rows.append(stages(vm, sizes))
            log = tcg_split.log_path(vm).read_bytes()
        splits.append(tcg_split.split(log, dict(zip(TCG_STAGES, sizes))))

    benchmark.pedantic(round_, rounds=3)
    pool = WarmPool(vmfork_snapshot, bench_run, bench_network, size=1)
    try:
        with fork(vmfork_snapshot, run=bench_run, network=bench_network, pool=pool,
                  mailboxes={MAILBOX: {"tb": 2}}) as vm:
            assert vm.timings.get("prewarmed"), vm.timings
            warm = stages(vm)
    finally:
        pool.close()
    # The log is flushed per block and both are read with the guest paused: they agree
    # (measured: exactly, at times off by one); more means a buffered or truncated log
    # (the fork's file size limit).
    lag = [split_lag(row, s) for row, s in zip(rows, splits)]
    assert all(abs(n) <= TCG_SPLIT_SLACK for behind in lag for n in behind.values()), lag
    cold = {k: int(statistics.median(r[k] for r in rows)) for k in rows[0]}
    split = {k: {c: int(statistics.median(s[k][c] for s in splits)) for c in ("kernel", "user")}
             for k in TCG_STAGES}
    benchmark.extra_info.update({"kind": "tcg_blocks", "cold_fork": cold, "prewarmed_fork": warm,
                                 "split": split, "split_behind_info_jit": lag})
    bench_say(
        f"TCG blocks translated, cold fork: {cold['ready']} to ready, +{cold['first_exec']} first exec, "
        f"+{cold['second_exec']} second exec; pre-warmed pool fork: {warm['ready']} (pre-warm and request), "
        f"+{warm['first_exec']} first exec, +{warm['second_exec']} second"
    )
    bench_say("TCG blocks of a cold fork, kernel / user: " + ", ".join(
        f"{k} {split[k]['kernel']} / {split[k]['user']}" for k in TCG_STAGES))


# --- 2c: what a small test costs, and a suite of them --------------------------------


def summary_s(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(values), "min": round(ordered[0], 3), "p50": round(statistics.median(values), 3),
            "p95": round(percentile(values, 0.95), 3), "max": round(ordered[-1], 3)}


def test_cpu_per_small_test(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_say: Any,
) -> None:
    """The CPU one small test costs (fork with one payload + 4 commands + close,
    library, no network): the fork's QEMU (utime + stime from /proc/<pid>/stat just
    before close) plus this process's own. Under TCG the QEMU part is the guest code
    the test runs for the first time (tests/bench/small_test_cpu.py)."""
    rows: list[tuple[float, float, float]] = []
    counter = iter(range(1_000_000))

    def target() -> None:
        rows.append(small_test_cpu.small_test(vmfork_snapshot, bench_run, next(counter)))

    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    measured = rows[WARMUP_ROUNDS:]
    info = {"kind": "cpu_per_small_test", "commands": len(small_test_cpu.COMMANDS), "rounds": len(measured),
            # one value per test (tests/bench/report.py draws them), and their summaries
            "qemu_cpu_s": [r[0] for r in measured], "host_cpu_s": [r[1] for r in measured],
            "cpu_s": [r[0] + r[1] for r in measured], "wall_s": [r[2] for r in measured],
            "host_after": host_state()}
    info["summary"] = {key: summary_s(info[key]) for key in ("qemu_cpu_s", "host_cpu_s", "cpu_s", "wall_s")}
    benchmark.extra_info.update(info)
    q, h, c = (info["summary"][key] for key in ("qemu_cpu_s", "host_cpu_s", "cpu_s"))
    bench_say(f"CPU per small test (fork + 4 commands + close): p50 {c['p50']:.3f} s"
              f" (QEMU {q['p50']:.3f} s, host Python {h['p50']:.3f} s)")


def test_steady_exec_against_the_guest_shell(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_say: Any,
) -> None:
    """A running fork's ``exec(["true"])`` against the guest shell's own spawn of
    /bin/true: what the control channel adds to a command once all is translated."""
    with fork(vmfork_snapshot, run=bench_run) as vm:
        figures = benchmark.pedantic(small_test_cpu.steady_exec, args=(vm,), rounds=1)
    info = {"kind": "steady_exec", **figures,
            "ratio": round(figures["exec_true_p50_ms"] / max(figures["shell_spawn_true_ms"], 1e-3), 2)}
    benchmark.extra_info.update(info)
    bench_say(f"steady exec(['true']): p50 {info['exec_true_p50_ms']:.1f} ms, the guest shell's spawn of"
              f" /bin/true {info['shell_spawn_true_ms']:.1f} ms ({info['ratio']:.2f}x)")


SUITE_TESTS = env_int("VMFORK_BENCH_SUITE_TESTS", 120)


@pytest.mark.parametrize("pool", [0, 1])
def test_suite_of_small_tests(
    benchmark: Any,
    pool: int,
    bench_settings: Any,
    bench_say: Any,
) -> None:
    """A user's suite: SUITE_TESTS tests of 4 commands and one payload each, run by
    pytest with ``-n 2`` and the warm pool off and on (tests/bench/suite_ab.py)."""
    with tempfile.TemporaryDirectory(prefix="vmfork-suite-") as tmp:
        project = Path(tmp)
        (project / "conftest.py").write_text(suite_ab.CONFTEST)
        (project / "test_small.py").write_text(suite_ab.TESTS.format(n=SUITE_TESTS))
        (project / "pytest.ini").write_text("[pytest]\n")
        cache = str(bench_settings.cache_dir)
        suite_ab.run_suite(project, cache, 0, 1, "test_small.py::test_small[0]")  # the snapshot: untimed
        wall, code, out = benchmark.pedantic(suite_ab.run_suite, args=(project, cache, pool, 2, str(project)),
                                             rounds=1)
    assert code == 0, out
    info = {"kind": "suite", "tests": SUITE_TESTS, "commands": 4, "workers": 2, "pool": pool,
            "wall_s": round(wall, 1), "tests_per_s": round(SUITE_TESTS / wall, 2), "host_after": host_state()}
    benchmark.extra_info.update(info)
    bench_say(f"suite of {SUITE_TESTS} small tests, -n 2, pool {'on' if pool else 'off'}: {wall:.1f} s,"
              f" {info['tests_per_s']:.2f} tests/s")


# --- 3: cold boot of the same template ------------------------------------------


def test_cold_boot_template(
    benchmark: Any,
    vmfork_template: Template,
    vmfork_snapshot: Snapshot,
    bench_settings: Any,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """Boot the template and take its snapshot from scratch, in a fresh cache that
    shares only the (already built) guest image: the cost every fork avoids."""
    images = (Path(bench_settings.cache_dir) / "images").resolve()
    assert images.is_dir(), f"no image cache at {images}"
    snaps: list[Snapshot] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        cache = Path(tempfile.mkdtemp(prefix="vmfork-bench-cold-"))
        (cache / "images").symlink_to(images, target_is_directory=True)
        return (cache, Run()), {}

    def target(cache: Path, run: Run) -> None:
        snaps.append(SnapshotStore(cache, accel=vmfork_snapshot.machine.accel).get(vmfork_template, run=run))

    def teardown(cache: Path, run: Run) -> None:
        run.remove()
        (cache / "images").unlink()  # the link only; the shared image cache stays
        shutil.rmtree(cache)

    before = host_state()
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=COLD_ROUNDS)
    assert all(
        not s.cache_hit and s.key == vmfork_snapshot.key for s in snaps
    ), "not a cold boot of the same template"
    boot_s = [s.boot_s for s in snaps]
    build_s = [s.build_s for s in snaps]
    info: dict[str, Any] = {
        "kind": "cold_boot",
        "rounds": len(snaps),
        "accel": vmfork_snapshot.machine.accel,
        "memory_mib": vmfork_snapshot.machine.memory_mib,
        "boot_s": boot_s,  # QEMU start -> guest agent ready
        "build_s": build_s,  # boot + warm-up + device-state save + verification
        "boot_s_median": round(statistics.median(boot_s), 3),
        "build_s_median": round(statistics.median(build_s), 3),
        "host_before": before,
        "host_after": host_state(),
    }
    line = (
        f"cold boot (template to agent ready): median {info['boot_s_median']:.2f} s over {len(snaps)} boots"
        f"  (whole snapshot build {info['build_s_median']:.2f} s)"
    )
    ratios = {}
    for which in ("restore_tap", "restore_none", "first_result_library", "first_result_plugin_0s",
                  "first_result_plugin_1s"):
        if which in bench_results:
            p50 = bench_results[which]["p50"]
            ratios[which] = {
                "restore_p50_ms": p50,
                "cold_boot_over_restore_p50": round(info["boot_s_median"] * 1000 / p50, 1),
                "snapshot_build_over_restore_p50": round(info["build_s_median"] * 1000 / p50, 1),
            }
    info["ratios"] = ratios
    benchmark.extra_info.update(info)
    bench_say(line)
    for which, r in ratios.items():
        bench_say(
            f"cold boot / fork restore p50 ({which}): {r['cold_boot_over_restore_p50']:.0f}x"
            f"  (snapshot build / restore: {r['snapshot_build_over_restore_p50']:.0f}x)"
        )
    if not ratios:
        bench_say("cold boot / fork restore: run the restore benchmarks in the same session for the ratio")


# --- 4: forks per second, two processes like `-n 2` ---------------------------------


def forks_worker(
    snap: Snapshot,
    run_id: str,
    worker: str,
    count: int,
    tap: dict[str, Any] | None,
    barrier: Any,
    results: Any,
) -> None:
    """One process (like an xdist worker): fork and close ``count`` VMs back to back."""
    run = Run(run_id=run_id, worker=worker)
    net: RunNetwork | None = None
    try:
        if tap is not None:
            net = RunNetwork(run_id, pool=tap["pool"], lease_root=tap["lease_root"]).up()  # joins the bridge
        barrier.wait(120)
        start = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        restore = []
        for _ in range(count):
            vm = fork(snap, run=run, network=net or "none")
            try:
                restore.append(vm.timings["restore_to_healthy_ms"])
            finally:
                vm.close()
        results.put({"worker": worker, "start": start, "end": time.monotonic(), "restore_ms": restore})
    except BaseException as exc:  # reported to the parent, which fails the test
        barrier.abort()
        results.put({"worker": worker, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        if net is not None:
            net.down()


@pytest.mark.parametrize("network", ["none", "tap"])
def test_forks_per_second_two_processes(
    benchmark: Any,
    network: str,
    vmfork_snapshot: Snapshot,
    bench_run: Run,
    bench_settings: Any,
    request: pytest.FixtureRequest,
    bench_say: Any,
) -> None:
    tap = None
    if network == "tap":
        request.getfixturevalue("bench_network")  # the parent holds the bridge; workers join it
        tap = {"pool": bench_settings.subnet_pool, "lease_root": bench_settings.lease_dir}
    ctx = multiprocessing.get_context("spawn")
    outcome: dict[str, Any] = {}

    def target() -> None:
        barrier, results = ctx.Barrier(FORK_WORKERS), ctx.Queue()
        procs = [
            ctx.Process(
                target=forks_worker,
                name=f"vmfork-bench-{i}",
                args=(vmfork_snapshot, bench_run.run_id, f"b{i}", FORKS_PER_WORKER, tap, barrier, results),
            )
            for i in range(FORK_WORKERS)
        ]
        for p in procs:
            p.start()
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + 600
        try:
            while len(got) < len(procs):
                try:
                    got.append(results.get(timeout=2))
                except queue.Empty:
                    dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        raise AssertionError(f"fork workers {dead or 'timed out'} without a result") from None
        finally:
            for p in procs:
                p.join(60)
                if p.is_alive():
                    p.kill()
                    p.join()
        outcome["workers"] = got

    before = host_state()
    benchmark.pedantic(target, rounds=1)
    workers = outcome["workers"]
    errors = [w["error"] for w in workers if "error" in w]
    assert not errors, errors
    elapsed = max(w["end"] for w in workers) - min(w["start"] for w in workers)
    forks = sum(len(w["restore_ms"]) for w in workers)
    restore = [ms for w in workers for ms in w["restore_ms"]]
    info = {
        "kind": "forks_per_second",
        "network": network,
        "processes": FORK_WORKERS,
        "forks_per_process": FORKS_PER_WORKER,
        "forks": forks,
        "elapsed_s": round(elapsed, 3),
        "forks_per_s": round(forks / elapsed, 2),
        "restore_to_healthy_ms": restore,
        "restore_to_healthy": summary_ms(restore),
        "host_before": before,
        "host_after": host_state(),
    }
    benchmark.extra_info.update(info)
    bench_say(
        f"forks/s ({FORK_WORKERS} processes x {FORKS_PER_WORKER}, network={network}): "
        f"{info['forks_per_s']:.2f}  ({forks} forks+closes in {elapsed:.1f} s; "
        f"restore p50 under concurrency {info['restore_to_healthy']['p50']:.0f} ms)"
    )


# --- 4b: two whole runs at once, each -n 2 -------------------------------------------

TWO_RUNS_TESTS = env_int("VMFORK_BENCH_TWO_RUNS_TESTS", 12)
TWO_RUNS_CONFTEST = """
import pytest
from fixtures.templates import TEST_TEMPLATE

@pytest.fixture(scope="session")
def vmfork_template():
    return TEST_TEMPLATE
"""
TWO_RUNS_TEST = """
import pytest

@pytest.mark.parametrize("n", range({count}))
@pytest.mark.vmfork_mailbox("app-config", {{"bench": "two-runs"}})
def test_first_result(vm, n):
    assert vm.exec(["true"]).returncode == 0
"""


def summary_figure(out: str, prefix: str) -> float:
    """The p50 (ms) of the summary line starting with ``prefix``."""
    for line in out.splitlines():
        if line.startswith(prefix):
            return float(line.split(" p50 ", 1)[1].split()[0])
    raise AssertionError(f"no {prefix!r} line in the run's summary:\n{out[-3000:]}")


def test_two_runs_at_once_each_with_two_workers(
    benchmark: Any,
    vmfork_snapshot: Snapshot,
    bench_settings: Any,
    tmp_path: Path,
    bench_say: Any,
) -> None:
    """Two whole pytest runs of the same suite started together, each ``-n 2`` with the
    plugin's defaults (TAP network, warm pool): concurrent runs on one host, as CI
    runners and developers do. Figures are the runs' own summaries."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    suites = []
    for i in range(2):
        suite = tmp_path / f"run{i}"
        suite.mkdir()
        (suite / "conftest.py").write_text(TWO_RUNS_CONFTEST)
        (suite / "test_two_runs.py").write_text(TWO_RUNS_TEST.format(count=TWO_RUNS_TESTS))
        suites.append(suite)
    env = {**os.environ, "PYTHONPATH": str(root), "VMFORK_CACHE_DIR": str(bench_settings.cache_dir)}
    env.pop("VMFORK_BENCH", None)
    outs: list[str] = []

    def target() -> None:
        procs = [subprocess.Popen([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q",
                                   str(suite)], cwd=suite, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for suite in suites]
        for p in procs:
            out, _ = p.communicate(timeout=900)
            assert p.returncode == 0, out[-4000:]
            outs.append(out)

    before = host_state()
    benchmark.pedantic(target, rounds=1)
    runs = [{"restore_p50_ms": summary_figure(out, "forks: "),
             "fork_first_exec_p50_ms": summary_figure(out, "fork + first exec ("),
             "summary": [line for line in out.splitlines() if line.startswith(("forks:", "fork + first", "warm pool"))]}
            for out in outs]
    benchmark.extra_info.update({"kind": "two_runs", "tests_per_run": TWO_RUNS_TESTS, "runs": runs,
                                 "host_before": before, "host_after": host_state()})
    bench_say(
        "two runs at once, each -n 2, " + f"{TWO_RUNS_TESTS} tests: " + "; ".join(
            f"run {i}: restore-to-healthy p50 {r['restore_p50_ms']:.0f} ms, fork + first exec p50 "
            f"{r['fork_first_exec_p50_ms']:.0f} ms" for i, r in enumerate(runs))
    )


# --- 5: memory per fork -------------------------------------------------------------


@pytest.mark.parametrize("source", ["template", "layer"])
def test_memory_per_fork(
    benchmark: Any, source: str, vmfork_snapshot: Snapshot, request: pytest.FixtureRequest, bench_run: Run,
    bench_say: Any,
) -> None:
    """PSS of the QEMU processes with 1, 10 and 20 forks alive, each ready and past one exec,
    of the template's snapshot or of a layer (its forks must stay copy-on-write too).

    Each round forks one more VM and runs one exec in it (that is what is timed);
    the untimed teardown measures every live QEMU when a level is reached.
    PSS splits the snapshot file's shared page-cache pages between all processes
    mapping it, other engineers' forks of the same snapshot included, so the
    private (USS) figure is recorded too, and so is the PSS of each class of
    mapping (tests/bench/forkmem.py: guest RAM copied or shared, TCG code, malloc,
    stacks, libraries, other) with the TCG translator's figures (HMP ``info jit``).
    """
    snap = vmfork_snapshot if source == "template" else request.getfixturevalue("bench_layer")
    vms: list[Any] = []
    levels: dict[str, Any] = {}
    top = max(MEMORY_COUNTS)

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([],), {}

    def target(box: list[Any]) -> None:
        vm = fork(snap, run=bench_run, network="none")
        box.append(vm)
        vm.exec(["cat", "/root/warmup-done"]).check()

    def teardown(box: list[Any]) -> None:
        vms.extend(box)
        if len(vms) not in MEMORY_COUNTS:
            return
        rollups = [smaps_rollup_kib(vm.pid) for vm in vms]
        total = {
            field: sum(r.get(field, 0) for r in rollups)
            for field in ("Pss", "Rss", "Pss_Anon", "Pss_File", "Private_Clean", "Private_Dirty")
        }
        uss = total["Private_Clean"] + total["Private_Dirty"]
        n = len(vms)
        classes = forkmem.per_fork_mib([forkmem.breakdown(vm.pid, snap.memory_path) for vm in vms])
        jit = [forkmem.tcg_stats(vm) for vm in vms] if snap.machine.accel == "tcg" else []
        levels[str(n)] = {
            "forks": n,
            "pss_total_mib": mib(total["Pss"]),
            "pss_per_fork_mib": mib(total["Pss"] / n),
            "rss_per_fork_mib": mib(total["Rss"] / n),
            "pss_file_per_fork_mib": mib(total["Pss_File"] / n),
            "pss_anon_per_fork_mib": mib(total["Pss_Anon"] / n),
            "private_per_fork_mib": mib(uss / n),
            "other_mappers_of_snapshot": len(
                set(mappers_of(snap.memory_path)) - {vm.pid for vm in vms}
            ),
            "classes_per_fork_mib": classes,  # {class: {pss, rss, private}}
            "tcg_code_mib_median": mib(statistics.median(j["code_bytes"] for j in jit) / 1024) if jit else None,
            # A fork's QEMU flushes once as the device state loads (the RAM changed under the
            # translator); each further flush is a full translation buffer.
            "tcg_full_buffer_flushes_max": max(j["flushes"] for j in jit) - 1 if jit else None,
        }

    before = host_state()
    try:
        benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=top)
    finally:
        for vm in vms:
            vm.close()
    info = {
        "kind": "memory",
        "snapshot": source,
        "network": "none",
        "template_memory_mib": vmfork_snapshot.machine.memory_mib,
        "accel": vmm.accel_option(snap.machine.accel, snap.machine.vcpus),
        "levels": levels,
        "host_before": before,
        "host_after": host_state(),
    }
    benchmark.extra_info.update(info)
    for n in MEMORY_COUNTS:
        lv = levels[str(n)]
        bench_say(
            f"memory, {n} concurrent forks of a {info['template_memory_mib']} MiB {source}: "
            f"PSS total {lv['pss_total_mib']:.1f} MiB, {lv['pss_per_fork_mib']:.1f} MiB/fork "
            f"(private {lv['private_per_fork_mib']:.1f} MiB/fork, RSS {lv['rss_per_fork_mib']:.1f} MiB/fork; "
            f"{lv['other_mappers_of_snapshot']} other QEMUs mapped the snapshot)"
        )
    lv = levels[str(top)]
    parts = ", ".join(f"{cls} {c['pss']:.1f}" for cls, c in lv["classes_per_fork_mib"].items())
    tcg = (f"; TCG code in use {lv['tcg_code_mib_median']:.1f} MiB median, "
           f"{lv['tcg_full_buffer_flushes_max']} flushes of a full buffer at most"
           if lv["tcg_code_mib_median"] is not None else "")
    bench_say(f"  PSS per fork at {top} forks by mapping (MiB; -accel {info['accel']}): {parts}{tcg}")


# --- 6: layers: vm.snapshot() of a running fork, forks of the layer -----------------

LAYER_DIRTY_MIB = 32  # what a layer's setup writes to guest RAM (tmpfs): the layer's own pages


def make_layer_vm(snap: Snapshot, run: Run) -> Any:
    """A fork that did some setup: a file, a background process, dirty RAM."""
    vm = fork(snap, run=run, network="none")
    vm.exec(f"head -c {LAYER_DIRTY_MIB << 20} /dev/urandom > /dev/shm/layer && echo seeded > /root/seed && "
            "setsid sleep 86400 </dev/null >/dev/null 2>&1 &").check()
    return vm


@pytest.fixture(scope="module")
def bench_layer(vmfork_snapshots: Any, vmfork_template: Template, bench_run: Run) -> Iterator[Snapshot]:
    """A layer of the template (depth 1), removed after the benchmarks."""
    vm = make_layer_vm(vmfork_snapshots(vmfork_template), bench_run)
    try:
        snap = vm.snapshot("bench layer", resume=False)
    finally:
        vm.close()
    yield snap
    discard(snap)


def test_vm_snapshot_time_and_size(
    benchmark: Any, vmfork_snapshot: Snapshot, bench_run: Run, bench_say: Any
) -> None:
    """vm.snapshot() of a fork that did some setup: the call is what is timed
    (stop, migrate + split, verify, resume to the guest's readiness signal)."""
    timings: list[dict[str, Any]] = []

    def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ([make_layer_vm(vmfork_snapshot, bench_run)], []), {}

    def target(vms: list[Any], out: list[Snapshot]) -> None:
        out.append(vms[0].snapshot("bench"))

    def teardown(vms: list[Any], out: list[Snapshot]) -> None:
        vm = vms[0]
        try:
            timings.append({k: v for k, v in vm.timings.items() if k.startswith("snapshot")})
            assert vm.exec(["cat", "/root/seed"]).stdout == b"seeded\n", "the VM did not run on"
        finally:
            vm.close()
            for snap in out:
                discard(snap)

    before = host_state()
    benchmark.pedantic(target, setup=setup, teardown=teardown, rounds=SNAPSHOT_ROUNDS)
    series = {k: [t[k] for t in timings] for k in ("snapshot_ms", "snapshot_pause_ms")}
    sizes = [t["snapshot_bytes"] for t in timings]
    info = {
        "kind": "layer_snapshot",
        "rounds": len(timings),
        "memory_mib": vmfork_snapshot.machine.memory_mib,
        "dirty_mib": LAYER_DIRTY_MIB,
        "snapshot_ms": series["snapshot_ms"],
        "snapshot": summary_ms(series["snapshot_ms"]),
        "pause": summary_ms(series["snapshot_pause_ms"]),
        "snapshot_bytes": sizes,
        "snapshot_mib_median": mib(statistics.median(sizes) / 1024),
        "stream_mib_median": mib(statistics.median(t["snapshot_stream_bytes"] for t in timings) / 1024),
        "host_before": before,
        "host_after": host_state(),
    }
    benchmark.extra_info.update(info)
    s, p = info["snapshot"], info["pause"]
    bench_say(
        f"vm.snapshot() of a {info['memory_mib']} MiB fork ({LAYER_DIRTY_MIB} MiB written by its setup): "
        f"p50 {s['p50']:.0f} ms  max {s['max']:.0f} ms (paused p50 {p['p50']:.0f} ms); "
        f"{info['snapshot_mib_median']:.0f} MiB on disk (stream {info['stream_mib_median']:.0f} MiB)"
    )


def test_restore_to_healthy_layer_tap_and_mailbox(
    benchmark: Any,
    bench_layer: Snapshot,
    bench_run: Run,
    bench_network: RunNetwork,
    bench_results: dict[str, Any],
    bench_say: Any,
) -> None:
    """A fork of a layer, like the template's first benchmark: TAP handoff plus one mailbox."""
    info = bench_restore(benchmark, bench_layer, bench_run, network=bench_network, with_payload=True)
    bench_results["restore_layer_tap"] = info["restore_to_healthy"]
    s = info["restore_to_healthy"]
    bench_say(
        f"restore of a layer (depth 1, tap + mailbox): p50 {s['p50']:.0f} ms  p95 {s['p95']:.0f} ms"
        f"  max {s['max']:.0f} ms"
    )
