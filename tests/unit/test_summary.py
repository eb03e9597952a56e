"""The run summary's per-snapshot merge across xdist workers (pure logic)."""

from pytest_vmfork.plugin import merge_snapshot_stats


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
