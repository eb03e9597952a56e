"""The run summary's per-snapshot merge across xdist workers (pure logic)."""

from pytest_vmfork.plugin.stats import RunStats, merge_snapshot_stats


def report(key: str, hit: bool, ms: list[float], template: str = "256 MiB, 1 vCPU") -> dict:
    return {"key": key, "template": template, "cache_hit": hit, "build_s": 0.0 if hit else 9.5,
            "boot_s": 8.0, "restore_ms": ms}


def test_workers_reports_merge_per_key_a_build_beats_a_hit_and_forks_add_up():
    merged = merge_snapshot_stats([
        report("aaa", True, [100.0]),  # worker 1 waited on worker 2's lock, then loaded it
        report("bbb", True, [300.0, 310.0], "512 MiB, 1 vCPU"),
        report("aaa", False, [120.0, 130.0]),  # worker 2 booted it
        report("bbb", True, []),
    ])
    assert [(m["key"], m["cache_hit"], m["builds"], sorted(m["restore_ms"])) for m in merged] == [
        ("aaa", False, 1, [100.0, 120.0, 130.0]),
        ("bbb", True, 0, [300.0, 310.0]),
    ]
    assert merged[0]["build_s"] == 9.5 and merged[1]["template"] == "512 MiB, 1 vCPU"


def test_two_processes_that_both_booted_one_key_are_counted():
    merged = merge_snapshot_stats([report("aaa", False, []), report("aaa", False, [])])
    assert merged[0]["builds"] == 2  # the summary then says "booted by 2 processes"


def fork_timings(restore: float, first_exec: float | None = None, path: str = "ack", prewarmed: bool = False):
    t = {"restore_to_healthy_ms": restore, "handoff_path": path, "prewarmed": prewarmed}
    if first_exec is not None:
        t["first_exec_ms"] = first_exec
    return t


def test_a_run_that_forked_and_built_nothing_has_no_summary():
    assert RunStats().summary_lines() == []


def test_the_controller_summary_adds_up_its_workers_forks_and_repeats_their_messages_once():
    controller = RunStats()
    for restore in (100.0, 300.0):
        worker = RunStats()
        worker.record_fork("aaa", fork_timings(restore, first_exec=50.0, prewarmed=restore < 200))
        worker.record_release("aaa", fork_timings(restore, first_exec=50.0))
        worker.messages.append("vmfork: no CAP_NET_ADMIN")
        worker.snapshots = [report("aaa", True, worker.restore_by_key["aaa"])]
        controller.add_worker(worker.export())
    lines = controller.summary_lines()
    assert lines[0] == "vmfork: no CAP_NET_ADMIN" and lines.count("vmfork: no CAP_NET_ADMIN") == 1
    assert "  2 forks, restore-to-healthy p50 200 ms, p95 300 ms" in lines
    assert any(line.startswith("forks: 2  restore-to-healthy p50 200 ms") for line in lines)
    assert "warm pool: 1 of 2 forks came pre-warmed, 1 forked cold" in lines
    assert "network handoff: 2 by guest ack, 0 by the control channel's fallback" in lines


def test_a_fork_handed_off_by_the_fallback_is_pointed_out_in_the_summary():
    stats = RunStats()
    stats.record_fork("aaa", fork_timings(150.0, path="ctl-fallback"))
    line = next(line for line in stats.summary_lines() if line.startswith("network handoff"))
    assert "0 by guest ack, 1 by the control channel's fallback" in line and "did not arrive in time" in line


def test_a_fork_whose_test_ran_no_command_is_not_counted_in_first_results():
    stats = RunStats()
    stats.record_fork("aaa", fork_timings(150.0))
    stats.record_release("aaa", fork_timings(150.0))
    assert stats.first_result_ms == [] and stats.forks == 1
    stats.record_release("aaa", fork_timings(150.0, first_exec=40.0))
    assert stats.first_result_ms == [190.0] and stats.first_result_by_key == {"aaa": [190.0]}
