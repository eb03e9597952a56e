"""The cache module's logic on entries laid out as the builders lay them out:
last-use records, dependants, liveness by lock, parsing of sizes and ages."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_vmfork.cli import main as vmfork_main
from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host import cache
from pytest_vmfork.janitor.prune import prune
from pytest_vmfork.plugin.options import resolve_settings
from pytest_vmfork.vm.accel import short_reason

DAY = 86400.0
ROOT, IMAGE, SNAP = "r" * 64, "i" * 64, "s" * 24


def make_entry(cache_dir: Path, kind: str, key: str, doc: dict, size: int = 8192) -> Path:
    path = cache_dir / cache.KINDS_DIRS[kind] / key
    path.mkdir(parents=True)
    (path / ("root.json" if kind == "root" else "manifest.json")).write_text(json.dumps({"key": key, **doc}))
    (path / "data").write_bytes(b"x" * size)
    return path


def make_cache(root: Path) -> dict[str, Path]:
    return {
        "root": make_entry(root, "root", ROOT, {"spec": {"kernel_flavour": "amd64", "packages": ["jq"]}}),
        "image": make_entry(root, "image", IMAGE, {"root_key": ROOT, "spec": {"kernel_flavour": "amd64"}}),
        "snapshot": make_entry(root, "snapshot", SNAP, {"image_key": IMAGE, "description": "256 MiB, 1 vCPU"}),
    }


def test_sizes_and_ages_in_the_documented_forms_parse() -> None:
    assert cache.parse_size("10G") == 10 << 30
    assert cache.parse_size("500MiB") == 500 << 20
    assert cache.parse_size("1.5g") == 3 << 29
    assert cache.parse_size("4096") == 4096
    assert cache.parse_age("30d") == 30 * DAY
    assert cache.parse_age("2w") == 14 * DAY
    assert cache.parse_age("90m") == 5400


@pytest.mark.parametrize("argv, names", [
    (["--older-than", "3x"], "--older-than '3x' is not a duration: use a number with a unit s, m, h, d or w"),
    (["--max-size", "lots"], "--max-size 'lots' is not a size: use a number of bytes or one with a unit K, M, G"),
    ([], "needs --older-than AGE (e.g. 30d), --max-size SIZE (e.g. 10G) or --orphans"),
])
def test_bad_prune_arguments_are_refused_naming_the_accepted_forms(tmp_path, capsys, argv, names) -> None:
    make_cache(tmp_path)
    assert vmfork_main(["cache", "prune", "--cache-dir", str(tmp_path), *argv]) == 2
    assert names in capsys.readouterr().err
    assert (tmp_path / "snapshots" / SNAP).is_dir()  # nothing removed


def test_the_size_cap_is_an_option_with_an_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("VMFORK_CACHE_MAX_SIZE", "2G")
    assert resolve_settings(lambda name: None, lambda name: None).cache_max_size == 2 << 30
    monkeypatch.setenv("VMFORK_CACHE_MAX_SIZE", "big")
    with pytest.raises(ConfigError, match="is not a size: use a number of bytes"):
        resolve_settings(lambda name: None, lambda name: None)


def test_a_moved_cache_keeps_its_last_use_records(tmp_path) -> None:
    entries = make_cache(tmp_path / "a")
    used_at = time.time() - 12 * DAY
    assert cache.record_use(entries["snapshot"], now=used_at)
    assert cache.record_use(entries["image"], now=used_at - DAY)  # as snapshot.record_use does with its image
    cache.release_all()
    # copied as a CI artefact or a careless cp -r would: no timestamps kept
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=shutil.copyfile)
    shutil.rmtree(tmp_path / "a")
    listed = {e.kind: e for e in cache.list_entries(tmp_path / "b")}
    assert listed["snapshot"].used == pytest.approx(used_at, abs=0.01)
    assert listed["image"].used == pytest.approx(used_at, abs=0.01)  # used through its snapshot since
    assert listed["snapshot"].what == "template: 256 MiB, 1 vCPU"
    assert listed["root"].what == "Debian root: kernel amd64, packages jq"


def test_entries_whose_dependants_are_gone_are_pruned(tmp_path) -> None:
    entries = make_cache(tmp_path)
    orphan_root = make_entry(tmp_path, "root", "o" * 64, {"spec": {}})
    broken = make_entry(tmp_path, "snapshot", "b" * 24, {"image_key": "gone" * 16})
    report = prune(tmp_path, older_than=None)
    assert {i.entry.path: i.reason for i in report.removed} == {
        broken: "its image gonegonegone is gone", orphan_root: "no image uses this Debian root"}
    assert all(p.is_dir() for p in entries.values())


def test_a_root_is_kept_while_an_image_build_holds_its_lock(tmp_path) -> None:
    orphan_root = make_entry(tmp_path, "root", "o" * 64, {"spec": {}})
    (tmp_path / "images").mkdir()
    with FileLock(str(tmp_path / "images" / f"{'n' * 64}.lock")):  # an image being built may want this root
        assert prune(tmp_path).removed == []
    assert [i.entry.path for i in prune(tmp_path).removed] == [orphan_root]


HOLDER = """
import sys, time
from pathlib import Path
from pytest_vmfork.host import cache
assert cache.record_use(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.readline()
"""


def test_an_entry_a_live_process_uses_is_left_alone_until_the_process_is_gone(tmp_path) -> None:
    entries = make_cache(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(entries["snapshot"])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout and holder.stdout.readline() == "held\n"
        report = prune(tmp_path, max_size=0)
        reasons = {i.entry.kind: i.reason for i in report.skipped}
        assert reasons["snapshot"] == "in use by a running process (a pytest run or a vmfork command)"
        assert reasons["image"].startswith("still needed by snapshot")
        assert [i.entry.kind for i in report.removed] == []  # the root: still needed by the image
    finally:
        holder.communicate("\n", timeout=30)
    report = prune(tmp_path, max_size=0)  # the holder exited: its lock went with it
    assert [i.entry.kind for i in report.removed] == ["snapshot", "image", "root"]
    assert not any(p.exists() for p in entries.values())
    assert not cache.stamp_path(entries["snapshot"]).exists()


def test_recording_a_use_of_a_pruned_entry_says_it_is_gone(tmp_path) -> None:
    entries = make_cache(tmp_path)
    prune(tmp_path, max_size=0)
    assert cache.record_use(entries["snapshot"]) is False


def test_the_listing_names_kind_size_last_use_and_what(tmp_path) -> None:
    make_cache(tmp_path)
    make_entry(tmp_path, "snapshot", "kept_" + "k" * 19, {"image_key": IMAGE, "name": "test-x-abc123",
                                                          "kept": {"test": "t.py::test_x"}, "depth": 1})
    make_entry(tmp_path, "snapshot", "l" * 24, {"image_key": IMAGE, "layer": "seeded", "depth": 1})
    text = cache.format_entries(cache.list_entries(tmp_path))
    assert "kept VM test-x-abc123 of t.py::test_x" in text
    assert "layer seeded, depth 1" in text
    assert text.splitlines()[0].split() == ["KIND", "KEY", "SIZE", "LAST", "USED", "WHAT"]
    assert text.splitlines()[-1].startswith("5 entries, ")


def test_the_kvm_verdict_reason_is_its_first_line_without_qemu_prefixes() -> None:
    stored = ("QEMU exited under KVM: qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n"
              "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion `ret == "
              "cpu->kvm_msr_buf->nmsrs' failed.")
    assert short_reason(stored) == "QEMU exited under KVM: failed to set MSR 0x10a to 0x69"


def test_a_prune_drops_the_stamps_of_entries_removed_by_other_means(tmp_path) -> None:
    entries = make_cache(tmp_path)
    assert cache.record_use(entries["snapshot"])
    cache.release_all()
    shutil.rmtree(entries["snapshot"])  # as layer.discard or vmfork gc --kept do
    prune(tmp_path, older_than=30 * DAY)
    assert not cache.stamp_path(entries["snapshot"]).exists()
