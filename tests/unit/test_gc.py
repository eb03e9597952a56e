"""vmfork gc on fake leftovers with real processes: dead, live, reused and
zombie owners, stand-in VMMs that get SIGKILLed, leases, partial builds;
plus vmfork doctor's report. Every root is a tmp dir; the few host network
objects (a bridge, TAPs) are made by the test itself and named explicitly."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path
from typing import Iterator

import pytest

from pytest_vmfork import cli
from pytest_vmfork.cli import doctor
from pytest_vmfork.host import procid
from pytest_vmfork.janitor import gc as gcmod
from pytest_vmfork.janitor import links as gc_links
from pytest_vmfork.net import leaseroot, subnets
from pytest_vmfork.net import leases as lz
from pytest_vmfork.net import network as nw
from pytest_vmfork.net.forkleases import RunLeases

POOL = subnets.parse_pool("10.219.0.0/22")  # never touches the host: host_nets=[] and fake bridges


def start_of(pid: int) -> int:
    return procid.process_start_time(pid)


def state_of(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture
def dead() -> tuple[int, int]:
    """(pid, start time) of a process that ran and was reaped."""
    child = subprocess.Popen(["sleep", "60"])
    start = start_of(child.pid)
    child.kill()
    child.wait()
    return child.pid, start


@pytest.fixture
def zombie() -> Iterator[tuple[int, int]]:
    """(pid, start time) of a child that exited and is not reaped yet."""
    child = subprocess.Popen(["sleep", "0.2"])
    start = start_of(child.pid)
    deadline = time.monotonic() + 10
    while state_of(child.pid) != "Z":
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.02)
    yield child.pid, start
    child.wait()


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    r = {"run_root": tmp_path / "runs", "lease_root": tmp_path / "leases", "cache_dir": tmp_path / "cache"}
    for p in r.values():
        p.mkdir()
    return r


def collect(roots: dict[str, Path], **kw) -> gcmod.GcReport:
    kw.setdefault("link_names", ())  # no host-wide link sweep unless a test names its own links
    return gcmod.collect(**roots, **kw)


def me() -> dict:
    return {"pid": os.getpid(), "start_time": start_of(os.getpid()), "boot_id": procid.boot_id()}


def make_run(root: Path, run_id: str, pid: int, start: int | None, boot: str | None = None) -> Path:
    d = root / run_id[:16]
    d.mkdir()
    owner = {"pid": pid, "run_id": run_id}
    if start is not None:
        owner.update(start_time=start, boot_id=boot or procid.boot_id())
    (d / "owner.json").write_text(json.dumps(owner))
    return d


def make_vm(run_dir: Path, name: str, owner: tuple[int, int] | None, qemu: tuple[int, int] = (0, 0)) -> Path:
    d = run_dir / name
    d.mkdir()
    (d / "console.log").write_text("console\n")
    (d / "qmp.sock").touch()
    if owner is not None:
        (d / "handles.json").write_text(json.dumps({
            "owner_pid": owner[0], "owner_start_time": owner[1], "boot_id": procid.boot_id(), "name": name,
            "pid": qemu[0], "start_time": qemu[1], "run_id": run_dir.name, "tap": None, "ip": None}))
    return d


def fake_qemu(vm_dir: Path) -> subprocess.Popen:
    """A stand-in VMM: a process whose command line looks like our QEMU's (argv[0]
    included: a shell run under that name, waiting for a sleep)."""
    return subprocess.Popen(["qemu-system-x86_64", "-c", "sleep 60; :",
                             "-name", f"vmfork-{vm_dir.name},debug-threads=on",
                             "-chardev", f"file,id=con,path={vm_dir}/console.log"], executable="/bin/sh")


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


class LockHolder:
    """Another process holding an flock on ``path`` until closed (a running build, a busy run)."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "locked\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def kinds(items: list[gcmod.GcItem]) -> set[tuple[str, str]]:
    return {(i.kind, i.name) for i in items}


# --- run directories and owners ----------------------------------------------------------


def test_dead_reused_zombie_and_earlier_boot_owners_are_removed_live_ones_untouched(roots, dead, zombie):
    root = roots["run_root"]
    live = make_run(root, "live0001", os.getpid(), start_of(os.getpid()))
    make_vm(live, "fm-1-1", (os.getpid(), start_of(os.getpid())))
    make_vm(live, "fm-1-2", None)  # being set up: no handles yet
    gone = {
        "dead0001": make_run(root, "dead0001", *dead),
        "reused01": make_run(root, "reused01", os.getpid(), start_of(os.getpid()) - 1),
        "zombie01": make_run(root, "zombie01", *zombie),
        "oldboot1": make_run(root, "oldboot1", os.getpid(), start_of(os.getpid()), boot="another-boot"),
        "legacy01": make_run(root, "legacy01", dead[0], None),  # written before start times were recorded
    }
    make_vm(gone["dead0001"], "fw0-1-1", dead)
    make_vm(gone["dead0001"], "tm-1-2", None)  # a template boot dir: no handles
    legacy_live = make_run(root, "legacy02", os.getpid(), None)  # written after this process started

    report = collect(roots)
    assert {p.name for p in root.iterdir()} == {"live0001", "legacy02"}
    assert sorted(p.name for p in live.iterdir()) == ["fm-1-1", "fm-1-2", "owner.json"]
    assert legacy_live.is_dir()
    removed = {Path(i.name).name: i.reason for i in report.removed if i.kind == "run-dir"}
    assert removed.keys() == gone.keys()
    assert "does not exist" in removed["dead0001"]
    assert "was reused" in removed["reused01"]
    assert "zombie" in removed["zombie01"]
    assert "earlier boot" in removed["oldboot1"]
    assert "does not exist" in removed["legacy01"]
    assert {Path(i.name).name for i in report.removed if i.kind == "vm-dir"} == {"fw0-1-1", "tm-1-2"}
    assert sorted(report.live_runs) == ["legacy02", "live0001"]
    assert report.skipped == []


def test_a_live_runs_vm_of_a_dead_worker_is_removed_and_nothing_else(roots, dead):
    run = make_run(roots["run_root"], "run00001", os.getpid(), start_of(os.getpid()))
    mine = make_vm(run, "fw0-1-1", (os.getpid(), start_of(os.getpid())))
    theirs = make_vm(run, "fw1-2-1", dead)  # the worker that owned it was SIGKILLed
    report = collect(roots)
    assert mine.is_dir() and not theirs.exists() and (run / "owner.json").is_file()
    assert kinds(report.removed) == {("vm-dir", str(theirs))}
    assert "VM owner pid" in report.removed[0].reason


def test_a_dead_owners_run_stays_while_a_worker_or_its_network_lease_lives(roots, dead):
    worker_alive = make_run(roots["run_root"], "workers1", *dead)
    make_vm(worker_alive, "fw1-1-1", (os.getpid(), start_of(os.getpid())))
    leased = make_run(roots["run_root"], "leasedrun", *dead)
    lz.acquire_subnet("leasedrun", POOL, lease_root=roots["lease_root"], host_nets=[])  # held by this process
    report = collect(roots)
    assert worker_alive.is_dir() and leased.is_dir()
    assert report.removed == [] and sorted(report.live_runs) == ["leasedrun", "workers1"]


def test_a_run_dir_without_owner_record_is_only_removed_when_old(roots):
    young = roots["run_root"] / "young001"
    old = roots["run_root"] / "old00001"
    young.mkdir()
    old.mkdir()
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    report = collect(roots)
    assert young.is_dir() and not old.exists()
    assert kinds(report.removed) == {("run-dir", str(old))}


def test_kept_files_are_only_removed_on_request(roots, dead):
    kept = roots["run_root"] / "kept" / "run00001-fm-1-1"
    kept.mkdir(parents=True)
    (kept / "console.log").write_text("x")
    (kept / "handles.json").write_text(json.dumps({"owner_pid": dead[0], "owner_start_time": dead[1]}))
    leases_dir = roots["run_root"] / "leases"  # the fallback lease root lives here too
    leases_dir.mkdir()
    assert collect(roots).removed == [] and kept.is_dir() and leases_dir.is_dir()
    report = collect(roots, include_kept=True)
    assert not kept.exists() and leases_dir.is_dir()
    assert kinds(report.removed) == {("kept", str(kept))}


# --- VMM processes ------------------------------------------------------------------------


def test_an_orphaned_vmm_is_sigkilled_and_a_live_owners_vmm_is_not(roots, dead):
    dead_run = make_run(roots["run_root"], "deadrun1", *dead)
    live_run = make_run(roots["run_root"], "liverun1", os.getpid(), start_of(os.getpid()))
    orphan_dir = dead_run / "fm-1-1"
    orphan_dir.mkdir()
    kept_dir = live_run / "fm-2-1"
    kept_dir.mkdir()
    orphan, keep = fake_qemu(orphan_dir), fake_qemu(kept_dir)
    try:
        make_vm_handles = {orphan_dir: (dead, orphan), kept_dir: ((os.getpid(), start_of(os.getpid())), keep)}
        for d, (owner, proc) in make_vm_handles.items():
            (d / "handles.json").write_text(json.dumps({
                "owner_pid": owner[0], "owner_start_time": owner[1], "boot_id": procid.boot_id(),
                "name": d.name, "pid": proc.pid, "start_time": start_of(proc.pid)}))
        deadline = time.monotonic() + 10  # the stand-in must have exec'd for its cmdline to show
        while b"qemu-system" not in Path(f"/proc/{orphan.pid}/cmdline").read_bytes() or \
                b"qemu-system" not in Path(f"/proc/{keep.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.02)

        dry = collect(roots, dry_run=True)
        assert orphan.poll() is None and orphan_dir.is_dir()
        report = collect(roots)
        assert orphan.wait(5) == -9, "the orphaned VMM was not SIGKILLed"
        assert keep.poll() is None, "a live owner's VMM was killed"
        assert not dead_run.exists() and kept_dir.is_dir()
        assert ("vmm", f"pid {orphan.pid} (fm-1-1)") in kinds(report.removed)
        assert kinds(dry.removed) == kinds(report.removed)
    finally:
        for proc in (orphan, keep):
            proc.kill()
            proc.wait()


def test_a_vmm_without_handles_belongs_to_its_parent(roots):
    run = make_run(roots["run_root"], "liverun2", os.getpid(), start_of(os.getpid()))
    vm_dir = run / "tm-1-1"
    vm_dir.mkdir()
    proc = fake_qemu(vm_dir)  # a template boot: no handles.json, parent = this process
    try:
        time.sleep(0.2)
        report = collect(roots)
        assert proc.poll() is None and vm_dir.is_dir() and report.removed == []
    finally:
        proc.kill()
        proc.wait()


# --- leases --------------------------------------------------------------------------------


ABANDON_RECLAIM = """
import os, sys
from pytest_vmfork.net import leases as lz
lease = lz.acquire_subnet("older", sys.argv[2], lease_root=sys.argv[1], host_nets=[])
lz.release_subnet(lease, teardown=lambda: os._exit(0))  # dies after its tombstone, before finishing
"""


def test_stale_leases_tombstones_and_run_lease_dirs_are_removed_live_ones_kept(roots):
    lease_root = roots["lease_root"]
    child = subprocess.Popen(["sleep", "60"])
    stale = lz.acquire_subnet("deadrun", POOL, lease_root=lease_root, owner_pid=child.pid, host_nets=[])
    RunLeases("deadrun", stale.subnet, lease_root).allocate("f-dead", owner_pid=child.pid)
    live = lz.acquire_subnet("liverun", POOL, lease_root=lease_root, host_nets=[])
    RunLeases("liverun", live.subnet, lease_root).allocate("f-live")
    # an abandoned reclaim: its reclaimer died half-way
    subprocess.run([sys.executable, "-c", ABANDON_RECLAIM, str(lease_root), str(POOL[3])], check=True)
    # a per-run directory without any lease: dead fork entries only / a live one
    RunLeases("orphan", POOL[2], lease_root).allocate("f-x", owner_pid=child.pid)
    RunLeases("busy", POOL[2], lease_root).allocate("f-y")
    child.kill()
    child.wait()

    before = tree(lease_root)
    dry = collect(roots, dry_run=True)
    assert tree(lease_root) == before
    report = collect(roots)
    removed = kinds(report.removed)
    assert ("subnet-lease", str(stale.subnet)) in removed and ("subnet-lease", str(POOL[3])) in removed
    assert {("run-leases", "deadrun"), ("run-leases", "orphan")} <= removed
    assert kinds(dry.removed) == removed
    assert [i.name for i in report.skipped] == ["busy"]
    (left,) = lz.list_subnet_leases(lease_root)
    assert left["run_id"] == "liverun" and left["stale"] is None
    assert sorted(p.name for p in (lease_root / "runs").iterdir()) == ["busy", "liverun"]
    assert not list(leaseroot.host_lease_dir(lease_root).glob("reclaim-*"))
    assert lz.release_subnet(live)


def test_a_busy_host_lease_lock_is_skipped_not_waited_for(roots):
    child = subprocess.Popen(["sleep", "60"])
    lz.acquire_subnet("deadrun", POOL, lease_root=roots["lease_root"], owner_pid=child.pid, host_nets=[])
    child.kill()
    child.wait()
    holder = LockHolder(leaseroot.host_lease_dir(roots["lease_root"]) / ".lock")  # another process holds it
    try:
        t0 = time.monotonic()
        report = collect(roots, lock_timeout=0.2)
        assert time.monotonic() - t0 < 2
        assert [(i.kind, "busy" in i.reason) for i in report.skipped] == [("subnet-leases", True)]
        assert len(lz.list_subnet_leases(roots["lease_root"])) == 1
    finally:
        holder.close()
    assert kinds(collect(roots).removed) >= {("subnet-lease", str(POOL[0]))}


# --- partial builds ---------------------------------------------------------------------------


def test_partial_builds_of_dead_builders_are_removed_running_builds_kept(roots, dead):
    snaps, images = roots["cache_dir"] / "snapshots", roots["cache_dir"] / "images"
    snaps.mkdir()
    images.mkdir()
    key, ikey = "a" * 24, "b" * 64
    final = snaps / key
    final.mkdir()  # a complete snapshot: never touched
    (snaps / f"{key}.lock").touch()  # left by the dead builder
    builder = LockHolder(snaps / f"{'c' * 24}.lock")  # a running build of another key
    try:
        dead_staging = snaps / f".staging-{key}-{dead[0]}"
        trash = snaps / f".trash-{key}-{dead[0]}"
        reused = snaps / f".staging-{key}-{os.getpid()}"  # live pid, but nobody holds the key's lock
        running = snaps / f".staging-{'c' * 24}-{builder.pid}"
        img_staging = images / f".staging-{ikey}-{dead[0]}-{secrets.token_hex(4)}"
        img_old = images / f".old-{ikey}-{dead[0]}-{secrets.token_hex(4)}"
        for d in (dead_staging, trash, reused, running, img_staging, img_old):
            d.mkdir()
            (d / "memory.ram").write_bytes(b"x")
        dry = collect(roots, dry_run=True)
        assert all(d.exists() for d in (dead_staging, trash, reused, img_staging, img_old))
        report = collect(roots)
        assert running.is_dir() and final.is_dir()
        assert not any(d.exists() for d in (dead_staging, trash, reused, img_staging, img_old))
        assert kinds(report.removed) == kinds(dry.removed) == {
            ("snapshot-partial", str(dead_staging)), ("snapshot-partial", str(trash)),
            ("snapshot-partial", str(reused)), ("image-partial", str(img_staging)),
            ("image-partial", str(img_old))}
        assert kinds(report.skipped) == {("snapshot-partial", str(running))}
    finally:
        builder.close()


def test_a_dead_builders_partial_module_tree_is_removed_and_the_built_tree_kept(roots, dead):
    modules = roots["cache_dir"] / "modules"
    modules.mkdir()
    key = "d" * 64
    (modules / key).mkdir()  # a complete tree: never touched
    partial = modules / f".staging-{key}-{dead[0]}-{secrets.token_hex(4)}"
    partial.mkdir()
    (partial / "modules.sqfs").write_bytes(b"x")
    report = collect(roots)
    assert not partial.exists() and (modules / key).is_dir()
    assert kinds(report.removed) == {("modules-partial", str(partial))}


# --- dry run, speed, session start, the command -----------------------------------------------


def build_world(roots: dict[str, Path], dead: tuple[int, int]) -> None:
    make_vm(make_run(roots["run_root"], "deadrunA", *dead), "fm-1-1", dead)
    make_run(roots["run_root"], "liverunA", os.getpid(), start_of(os.getpid()))
    (roots["cache_dir"] / "snapshots").mkdir(exist_ok=True)
    (roots["cache_dir"] / "snapshots" / f".staging-{'d' * 24}-{dead[0]}").mkdir()


def test_dry_run_removes_nothing_and_lists_what_a_real_run_removes(roots, dead):
    build_world(roots, dead)
    before = {k: tree(v) for k, v in roots.items()}
    dry = collect(roots, dry_run=True)
    assert {k: tree(v) for k, v in roots.items()} == before
    assert dry.dry_run and dry.removed
    text = dry.format()
    assert "would remove run-dir" in text and "removed run-dir" not in text
    real = collect(roots)
    assert kinds(real.removed) == kinds(dry.removed)
    assert collect(roots).removed == []  # idempotent


def test_collect_is_cheap_when_there_is_nothing_to_do(roots):
    make_run(roots["run_root"], "liverunB", os.getpid(), start_of(os.getpid()))
    t0 = time.monotonic()
    report = collect(roots)
    assert time.monotonic() - t0 < 0.5 and report.removed == [] and report.skipped == []


def test_gc_at_session_start_is_silent_unless_it_removed_something(roots, dead):
    said: list[str] = []
    gcmod.gc_at_session_start(**roots, progress=said.append, link_names=())
    assert said == []
    build_world(roots, dead)
    report = gcmod.gc_at_session_start(**roots, progress=said.append, link_names=())
    assert len(report.removed) == 3
    (line,) = said
    assert line.startswith("vmfork: cleaned up after dead runs: ") and "1 run-dir" in line


def test_gc_at_session_start_is_time_bounded(roots, dead):
    build_world(roots, dead)
    report = gcmod.gc_at_session_start(**roots, budget_s=0.0, link_names=())
    assert report.removed == []
    assert report.skipped and all("time budget" in i.reason for i in report.skipped)


def test_vmfork_gc_command_prints_what_it_removed(roots, dead, monkeypatch, capsys):
    build_world(roots, dead)
    monkeypatch.setattr(gc_links, "host_links", dict)  # no host-wide link sweep from a unit test
    monkeypatch.setattr(tempfile, "tempdir", str(roots["run_root"].parent))  # base_dir() = <tmp>/vmfork-<uid>
    roots["run_root"].rename(roots["run_root"].parent / f"vmfork-{os.getuid()}")
    args = ["gc", f"--lease-dir={roots['lease_root']}", f"--cache-dir={roots['cache_dir']}"]
    assert cli.main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove run-dir" in out and "deadrunA" in out
    assert "liverunA" not in out.split("vmfork gc:")[0]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "removed run-dir" in out and out.strip().splitlines()[-1].startswith("vmfork gc: removed ")
    assert cli.main(args) == 0
    assert "vmfork gc: removed nothing" in capsys.readouterr().out


# --- host network objects made here (root only) -------------------------------------------------

needs_net_admin = pytest.mark.skipif(not nw.has_net_admin(), reason="needs CAP_NET_ADMIN")
TUNSETPERSIST = 0x400454CB


def persistent_tap(name: str) -> None:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, nw.TUNSETIFF, struct.pack("16sH22x", name.encode(), nw.TAP_FLAGS))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
    finally:
        os.close(fd)


@needs_net_admin
def test_a_stale_leases_bridge_and_an_unheld_tap_are_deleted_held_ones_kept(roots):
    subnet = IPv4Network(f"10.219.{4 + secrets.randbelow(200)}.0/24")
    child = subprocess.Popen(["sleep", "60"])
    stale = lz.acquire_subnet("deadnet", [subnet], lease_root=roots["lease_root"], owner_pid=child.pid,
                              host_nets=[])
    unheld, held = f"vt{secrets.token_hex(6)}", f"vt{secrets.token_hex(6)}"
    orphan_bridge = subnets.bridge_name(IPv4Network(f"10.219.{204 + secrets.randbelow(50)}.0/24"))
    held_fd = None
    try:
        nw.ensure_bridge(stale.bridge, stale.subnet)
        child.kill()
        child.wait()
        persistent_tap(unheld)
        held_fd = nw.open_tap(held, stale.bridge)  # non-persistent, held by this process
        nw.ensure_bridge(orphan_bridge, IPv4Network("10.219.255.0/29"))
        names = {unheld, held, orphan_bridge}

        dry = collect(roots, dry_run=True, link_names=names)
        assert nw.link_exists(stale.bridge) and nw.link_exists(unheld)
        report = collect(roots, link_names=names)
        assert not nw.link_exists(stale.bridge) and not nw.link_exists(unheld)
        assert nw.link_exists(held), "a TAP held by a live process was deleted"
        assert nw.link_exists(orphan_bridge), "a bridge of unknown ownership was deleted by default"
        removed = kinds(report.removed)
        assert {("bridge", stale.bridge), ("tap", unheld), ("subnet-lease", str(subnet))} <= removed
        assert kinds(dry.removed) == removed
        assert ("bridge", orphan_bridge) in kinds(report.skipped)
        assert "--orphan-links" in {i.name: i.reason for i in report.skipped}[orphan_bridge]

        os.close(held_fd)
        held_fd = None
        report = collect(roots, link_names=names, orphan_links=True)
        assert not nw.link_exists(orphan_bridge) and not nw.link_exists(held)
        assert ("bridge", orphan_bridge) in kinds(report.removed)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if held_fd is not None:
            os.close(held_fd)
        for name in (stale.bridge, unheld, orphan_bridge):
            nw.delete_link(name)


# --- vmfork doctor --------------------------------------------------------------------------------


def test_doctor_reports_each_check_and_an_overall_verdict(tmp_path, capsys):
    checks = doctor.diagnose(tmp_path / "empty-cache")
    names = [c.name for c in checks]
    for want in ("qemu", "kvm", "tun device", "bridge + TAP (CAP_NET_ADMIN)",
                 "/proc/<pid>/mem write (ptrace)", "setpriv (PDEATHSIG)", "disk space", "memory",
                 "image build (mmdebstrap)", "apt sources", "lz4"):
        assert want in names
    kvm = checks[names.index("kvm")]
    assert not kvm.ok and not kvm.required and "unknown until an image is built" in kvm.detail
    text = doctor.format(checks)
    assert text.splitlines()[-1].startswith("verdict: ")
    assert not nw.link_exists(doctor.DOCTOR_BRIDGE) and not nw.link_exists(doctor.DOCTOR_TAP)
    code = cli.main(["doctor", f"--cache-dir={tmp_path / 'empty-cache'}"])
    assert code == (1 if doctor.failed(checks) else 0)
    assert "verdict: " in capsys.readouterr().out


def test_doctor_format_gives_the_fix_for_each_problem():
    checks = [doctor.Check("qemu", True, "QEMU 7.2"),
              doctor.Check("setpriv (PDEATHSIG)", False, "not found", "apt-get install util-linux"),
              doctor.Check("kvm", False, "no /dev/kvm", "enable nested virtualisation", required=False)]
    text = doctor.format(checks)
    assert "ok    qemu" in text and "FAIL  setpriv (PDEATHSIG)" in text and "warn  kvm" in text
    assert "fix: apt-get install util-linux" in text and "fix: enable nested virtualisation" in text
    assert text.splitlines()[-1] == "verdict: NOT ready: 1 required check(s) failed (setpriv (PDEATHSIG))"
    assert doctor.format(checks[:1] + checks[2:]).splitlines()[-1] == "verdict: ready (1 warning(s): kvm)"


def test_a_forged_handles_json_naming_an_unrelated_process_leaves_it_alone(roots, dead, tmp_path):
    run = make_run(roots["run_root"], "forged01", *dead)
    unrelated = subprocess.Popen(["sleep", "60"])
    elsewhere = tmp_path / "elsewhere" / "fm-9-9"
    elsewhere.mkdir(parents=True)
    lookalike = fake_qemu(elsewhere)  # a QEMU-like command line, but of another VM
    try:
        deadline = time.monotonic() + 10  # the stand-in must have exec'd for its cmdline to show
        while b"qemu-system" not in Path(f"/proc/{lookalike.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        make_vm(run, "fm-9-1", dead, (unrelated.pid, start_of(unrelated.pid)))
        make_vm(run, "fm-9-2", dead, (lookalike.pid, start_of(lookalike.pid)))
        report = collect(roots)
        assert unrelated.poll() is None and lookalike.poll() is None, "gc killed a process that is not its QEMU"
        assert not run.exists()  # the dead run's files still go
        skipped = {i.name: i.reason for i in report.skipped if i.kind == "vmm"}
        assert "is not qemu-system-*" in skipped[f"pid {unrelated.pid} (fm-9-1)"]
        assert "is not vmfork-fm-9-2" in skipped[f"pid {lookalike.pid} (fm-9-2)"]
    finally:
        for proc in (unrelated, lookalike):
            proc.kill()
            proc.wait()


def test_gc_acts_on_nothing_in_a_run_root_others_can_write(roots, dead):
    run = make_run(roots["run_root"], "planted1", *dead)
    roots["run_root"].chmod(0o777)
    report = collect(roots)
    assert run.is_dir() and not [i for i in report.removed if i.kind in ("run-dir", "vm-dir", "vmm")]
    assert [i for i in report.skipped if i.kind == "run-root" and "writable by group or others" in i.reason]


def test_an_orphaned_vmm_running_as_the_recorded_qemu_user_is_killed_another_uid_is_not(roots, dead, other_user):
    run = make_run(roots["run_root"], "qemuuid1", *dead)
    recorded, unrecorded = run / "fm-7-1", run / "fm-7-2"
    procs = []
    for d in (recorded, unrecorded):
        d.mkdir()
        procs.append(subprocess.Popen(["qemu-system-x86_64", "-c", "sleep 60; :", "-name", f"vmfork-{d.name},x",
                                       "-add-fd", f"fd=3,set=1,opaque=path={d}/console.log"],
                                      executable="/bin/sh", user=other_user.uid, group=other_user.gid))
    try:
        deadline = time.monotonic() + 10  # the stand-ins must have exec'd for their cmdline to show
        while any(b"qemu-system" not in Path(f"/proc/{p.pid}/cmdline").read_bytes() for p in procs):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for d, proc, uid in ((recorded, procs[0], other_user.uid), (unrecorded, procs[1], None)):
            (d / "handles.json").write_text(json.dumps({
                "owner_pid": dead[0], "owner_start_time": dead[1], "boot_id": procid.boot_id(), "name": d.name,
                "pid": proc.pid, "start_time": start_of(proc.pid), "qemu_uid": uid}))
        report = collect(roots)
        assert procs[0].wait(5) == -9, "the orphaned VMM of the recorded QEMU user was not SIGKILLed"
        assert procs[1].poll() is None, "gc killed a process running as a uid it never started QEMU as"
        skipped = {i.name: i.reason for i in report.skipped if i.kind == "vmm"}
        assert f"runs as uid {other_user.uid}" in skipped[f"pid {procs[1].pid} (fm-7-2)"]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
