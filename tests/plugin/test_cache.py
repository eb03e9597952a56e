"""The cache with real entries: prune by age and by size, a size cap, a prune during a
running suite, and the accelerator verdict line (real VMs in inner pytest runs)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_vmfork.cli import main as vmfork_main
from pytest_vmfork.host import cache
from pytest_vmfork.janitor.prune import prune
from pytest_vmfork.vm.snapshot import Snapshot

from .suites import CONFTEST, finish

DAY = 86400.0
RUN_TIMEOUT = 600.0


def stamp(entry: Path, when: float) -> None:
    """Set an entry's last use as record_use would, without holding it."""
    cache.stamp_path(entry).write_bytes(b"%20.3f\n" % when)


def real_cache(root: Path, snap: Snapshot) -> dict[str, Path]:
    """A private cache holding hard-linked copies of the test snapshot, its image and the
    kernel's module trees (real entries: a hard link shares the data, removing it never touches the shared
    cache), plus a second, stale copy of the snapshot (a real copy) under another key."""
    root.mkdir(mode=0o700)
    image = snap.dir.parent.parent / "images" / snap.manifest["image_key"]
    (root / "snapshots").mkdir()
    (root / "images").mkdir()
    subprocess.run(["cp", "-al", str(snap.dir), str(root / "snapshots" / snap.key)], check=True)
    subprocess.run(["cp", "-al", str(image), str(root / "images" / image.name)], check=True)
    subprocess.run(["cp", "-al", str(snap.dir.parent.parent / "modules"), str(root / "modules")], check=True)
    stale = root / "snapshots" / "0123456789abcdef01234567"
    subprocess.run(["cp", "-a", "--sparse=always", str(snap.dir), str(stale)], check=True)  # its own blocks
    return {"snapshot": root / "snapshots" / snap.key, "image": root / "images" / image.name, "stale": stale}


def test_prune_by_age_removes_only_entries_unused_since_the_cutoff(tmp_path, vmfork_snapshot, capsys):
    entries = real_cache(tmp_path / "c", vmfork_snapshot)
    now = time.time()
    stamp(entries["snapshot"], now - 1 * DAY)
    stamp(entries["image"], now - 60 * DAY)  # used through its snapshot a day ago: must stay
    stamp(entries["stale"], now - 40 * DAY)
    listed = {e.key: e for e in cache.list_entries(tmp_path / "c")}
    assert listed[entries["image"].name].used == pytest.approx(now - DAY, abs=1)
    assert listed[entries["snapshot"].name].disk_bytes > 0

    assert vmfork_main(["cache", "prune", "--older-than", "30d", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert not entries["stale"].exists()
    assert entries["snapshot"].is_dir() and entries["image"].is_dir()
    assert not cache.stamp_path(entries["stale"]).exists()
    assert re.search(r"removed snapshot 0123456789abcdef01234567 .*last used 40d ago", out), out
    assert re.search(r"vmfork cache: freed \d+\.\dM \(1 entries\)", out), out


def test_prune_by_size_removes_least_recently_used_first_and_dependants_before_images(tmp_path, vmfork_snapshot):
    entries = real_cache(tmp_path / "c", vmfork_snapshot)
    now = time.time()
    stamp(entries["stale"], now - 3 * DAY)
    stamp(entries["snapshot"], now - 1 * DAY)
    stamp(entries["image"], now - 2 * DAY)
    sizes = {e.path: e.disk_bytes for e in cache.list_entries(tmp_path / "c")}
    keep = sizes[entries["snapshot"]] + sizes[entries["image"]]

    dry = prune(tmp_path / "c", max_size=keep, dry_run=True)
    assert [i.entry.path for i in dry.removed] == [entries["stale"]] and entries["stale"].exists()

    report = prune(tmp_path / "c", max_size=keep)
    assert [i.entry.path for i in report.removed] == [entries["stale"]]
    assert report.size_after <= keep and report.freed == sizes[entries["stale"]]

    report = prune(tmp_path / "c", max_size=0)
    assert [i.entry.kind for i in report.removed] == ["snapshot", "image"]  # never an image before its snapshot
    assert not entries["snapshot"].exists() and not entries["image"].exists()


INNER = """
import json, os, time
from pathlib import Path

def test_waits_for_the_prune_then_forks_again(vm, vm_factory):
    assert vm.exec(["cat", "/root/warmup-done"]).stdout == b"warmed\\n"
    Path(os.environ["MARK"]).write_text("up")
    deadline = time.monotonic() + 300
    while not Path(os.environ["GO"]).exists():  # the outer test prunes meanwhile
        assert time.monotonic() < deadline, "the outer test never said go"
        time.sleep(0.1)
    for other in (vm_factory(), vm_factory()):
        assert other.exec(["hello"]).returncode == 0
    assert vm.exec(["true"]).returncode == 0

def test_a_later_test_still_forks(vm):
    assert vm.exec(["hello"]).stdout.startswith(b"hello from")
"""


def inner_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFORK_")) and k != "PYTHONPATH"}
    env.update(VMFORK_CACHE_DIR=str(cache_dir), VMFORK_NETWORK="user", **extra)
    return env


def inner_pytest(where: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", *args],
                            cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_prune_during_a_running_suite_leaves_its_entries_alone_and_removes_the_rest(tmp_path, vmfork_snapshot):
    entries = real_cache(tmp_path / "c", vmfork_snapshot)
    stamp(entries["stale"], time.time() - 90 * DAY)
    stamp(entries["snapshot"], time.time() - 90 * DAY)  # old, but a live run is about to use it
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_inner.py").write_text(INNER)
    mark, go = tmp_path / "mark", tmp_path / "go"
    proc = inner_pytest(suite, "--vmfork-accel=tcg", env=inner_env(tmp_path / "c", MARK=str(mark), GO=str(go)))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not mark.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the inner suite's first VM never came up"
            time.sleep(0.2)
        report = prune(tmp_path / "c", older_than=DAY, max_size=0)
    finally:
        go.write_text("go")
    code, out = finish(proc, RUN_TIMEOUT)
    assert code == 0, out
    assert "2 passed" in out and "cache hit (no template boot)" in out, out
    assert [i.entry.path for i in report.removed] == [entries["stale"]]
    left = {i.entry.path: i.reason for i in report.skipped}
    assert "in use by a running process" in left[entries["snapshot"]]
    assert entries["image"] in left  # in use, or needed by the snapshot in use
    assert entries["snapshot"].is_dir() and entries["image"].is_dir()
    # the run recorded its use: the snapshot is no longer 90 days old
    used = {e.path: e.used for e in cache.list_entries(tmp_path / "c")}
    assert time.time() - used[entries["snapshot"]] < DAY


def test_the_size_cap_option_prunes_at_the_end_of_the_run_and_says_what_it_freed(tmp_path, vmfork_snapshot):
    entries = real_cache(tmp_path / "c", vmfork_snapshot)
    stamp(entries["stale"], time.time() - 5 * DAY)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_one.py").write_text("def test_one(vm):\n    assert vm.exec(['true']).returncode == 0\n")
    code, out = finish(inner_pytest(suite, "--vmfork-accel=tcg", env=inner_env(
        tmp_path / "c", VMFORK_CACHE_MAX_SIZE="1M")), RUN_TIMEOUT)
    assert code == 0, out
    assert not entries["stale"].exists()
    assert entries["snapshot"].is_dir() and entries["image"].is_dir()  # this run's: used until its very end
    assert re.search(r"vmfork: cache size cap: freed \d+\.\dM \(1 entries\).*still over the cap 1\.0M", out), out


def test_a_bad_size_cap_is_a_usage_error_naming_the_accepted_forms(tmp_path, pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--vmfork-cache-max-size=lots")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([("*vmfork cache max size 'lots' is not a size: use a number of bytes or one "
                                  "with a unit K, M, G or T*10G*")])


def test_the_accelerator_verdict_is_one_line_and_silent_when_cached_unless_verbose(tmp_path, vmfork_snapshot):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_one.py").write_text("def test_one(vm):\n    pass\n")
    shared = vmfork_snapshot.dir.parent.parent
    env = inner_env(shared)
    code, quiet = finish(inner_pytest(suite, "--vmfork-accel=auto", env=env), RUN_TIMEOUT)
    assert code == 0, quiet
    assert "vmfork: accelerator" not in quiet and "Assertion" not in quiet, quiet  # cached by the outer run
    code, loud = finish(inner_pytest(suite, "--vmfork-accel=auto", "-v", env=env), RUN_TIMEOUT)
    assert code == 0, loud
    lines = [line for line in loud.splitlines() if "vmfork: accelerator" in line]
    assert lines, loud
    verdict = vmfork_snapshot.manifest["machine"]["accel"]
    if verdict == "tcg":
        m = re.fullmatch(r"vmfork: accelerator tcg \(KVM unusable: ([^\n]{1,100}); details: (/\S+\.json)\)", lines[0])
        assert m, lines[0]
        assert "\n" not in m.group(1) and Path(m.group(2)).is_file()
        assert json.loads(Path(m.group(2)).read_text())["ok"] is False
    else:
        assert lines[0] == "vmfork: accelerator kvm"
    assert "Assertion" not in loud


COUNTING = """
import pytest
from pytest_vmfork.host import cache

calls = []
_real = cache.record_use

def counting(entry, **kw):
    calls.append(str(entry))
    return _real(entry, **kw)

cache.record_use = counting

def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"record_use calls: {len(calls)}")
"""


def test_last_use_is_recorded_once_per_lookup_never_per_fork(tmp_path, vmfork_snapshot):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST + COUNTING)
    (suite / "test_many.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', range(8))\ndef test_fork(vm, n):\n    pass\n")
    code, out = finish(inner_pytest(suite, "--vmfork-accel=tcg", env=inner_env(vmfork_snapshot.dir.parent.parent)),
                       RUN_TIMEOUT)
    assert code == 0, out
    # the snapshot and its image at the lookup and at the first fork: never again for the other 7
    assert "8 passed" in out and "record_use calls: 4" in out, out
