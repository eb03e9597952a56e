"""The fault matrix: real pytest runs (subprocesses) hit by real signals and
real failures, checked from outside for leftovers.

Every inner run uses the cached TEST_TEMPLATE snapshot, TAP networking with a
private lease root and a private /22 pool (10.217.<4 i>.0/22, one per test),
and a short private TMPDIR, so its run directory, QEMU processes, TAPs, bridge
and lease files are all attributable to it. The inner tests write a JSON
marker (``VMFK_MARK``) once their VM is up, so the outer test knows which
QEMU, TAP, worker and run to check, and when to strike.

After each fault: no QEMU of the run, no TAP, bridge or lease file of the run,
and the same suite passes when run again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from pytest_vmfork.janitor import gc
from pytest_vmfork.net import leaseroot, leases, subnets
from pytest_vmfork.net.network import has_net_admin

pytestmark = pytest.mark.skipif(not has_net_admin(), reason="TAP networking needs CAP_NET_ADMIN")

from .suites import CONFTEST, REPO, finish

RUN_TIMEOUT = 120.0  # one inner pytest run (a snapshot rebuild included)
MARK_TIMEOUT = 60.0  # until an inner test's VM is up
EXIT_TIMEOUT = 30.0  # from a signal to the inner run's exit


#: One suite for every fault; VMFK_FAULT selects what test_victim does, and
#: without it the whole suite simply passes (the "next run").
SUITE = r'''
import json, os, signal, time
from pathlib import Path

import pytest
from pytest_vmfork import ExecTimeout, VMForkError

FAULT = os.environ.get("VMFK_FAULT", "")
MARK = Path(os.environ["VMFK_MARK"])
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


def record(vm, **extra):
    data = {"name": vm.name, "pid": vm.pid, "tap": vm.tap,
            "run_id": vm.run.run_id, "run_dir": str(vm.run.dir), "test_pid": os.getpid(), **extra}
    tmp = MARK.with_name(MARK.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, MARK)


def test_victim(vm):
    assert vm.exec(["true"]).returncode == 0
    if FAULT == "hold":  # the outer test signals this process (or this worker)
        if WORKER != "main":  # -n: first another worker must have joined the run's network
            deadline = time.monotonic() + 60
            while not [p for p in MARK.parent.glob(MARK.name + ".next-*") if not p.name.endswith(WORKER)]:
                assert time.monotonic() < deadline, "no test ran on another worker"
                time.sleep(0.05)
        record(vm)
        time.sleep(120)
    elif FAULT == "qemu":
        os.kill(vm.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(VMForkError) as err:
            vm.exec(["true"], timeout=5)
        record(vm, error=f"{type(err.value).__name__}: {err.value}", elapsed=time.monotonic() - t0)
    elif FAULT == "hung":
        t0 = time.monotonic()
        with pytest.raises(ExecTimeout) as err:
            vm.exec(["sleep", "100"], timeout=1)
        record(vm, error=f"{type(err.value).__name__}: {err.value}", elapsed=time.monotonic() - t0)


@pytest.mark.parametrize("i", range(3))
def test_next(vm, i):
    assert vm.exec(["echo", "next"]).stdout == b"next\n"
    Path(f"{MARK}.next-{WORKER}").touch()
'''


# --- harness ------------------------------------------------------------------------


@dataclass
class Inner:
    """A generated suite with its private lease root, pool and TMPDIR."""

    dir: Path
    lease_root: Path
    pool: str
    tmp: Path  # TMPDIR of the inner runs: <tmp>/vmfork-<uid>/ is their run root
    mark: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def run_root(self) -> Path:
        return self.tmp / f"vmfork-{os.getuid()}"

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment, as for a pytest started by hand: nothing of the
        outer xdist worker (an inherited run id would merge the runs)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_", "VMFORK_NETWORK")) and k != "PYTHONPATH"}
        env.update(TMPDIR=str(self.tmp), VMFK_MARK=str(self.mark), PYTHONDONTWRITEBYTECODE="1")
        env.update(extra)
        return env

    def popen(self, *args: str, **env: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE",
               "--vmfork-network=tap", f"--vmfork-lease-dir={self.lease_root}",
               f"--vmfork-subnet-pool={self.pool}", *args]
        proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env(**env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = RUN_TIMEOUT, **env: str) -> tuple[int, str]:
        return finish(self.popen(*args, **env), timeout)

    def wait_mark(self, proc: subprocess.Popen, mark: Path | None = None,
                  timeout: float = MARK_TIMEOUT) -> dict:
        """The inner test's marker, once its VM is up (bounded; fails fast if the run ended)."""
        mark = mark or self.mark
        deadline = time.monotonic() + timeout
        while not mark.exists():
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"inner run ended (status {proc.returncode}) before its VM was up:\n"
                                     f"{out[-5000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no marker from the inner test within {timeout}s")
            time.sleep(0.05)
        return json.loads(mark.read_text())

    def gc(self, *args: str) -> subprocess.CompletedProcess:
        """`vmfork gc` on this suite's run root (TMPDIR) and lease root, as a user
        would run it; with an empty private cache dir (the shared one is not ours)."""
        return subprocess.run(
            [sys.executable, "-m", "pytest_vmfork.cli", "gc", f"--lease-dir={self.lease_root}",
             f"--cache-dir={self.tmp / 'cache'}", *args],
            env=self.env(), capture_output=True, text=True, timeout=60, cwd=REPO, check=False)


_POOL_INDEX = {"sigint": 0, "sigterm": 1, "worker": 2, "qemu": 3, "hung": 4, "cache": 5, "gc": 6}


@pytest.fixture
def inner(tmp_path: Path, vmfork_snapshot) -> Iterator:
    """Makes generated suites. Depending on vmfork_snapshot makes the cached
    snapshot exist before an inner run looks for it."""
    made: list[Inner] = []

    def make(label: str) -> Inner:
        root = tmp_path / f"suite-{label}"
        root.mkdir()
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "conftest.py").write_text(CONFTEST)
        (root / "test_suite.py").write_text(textwrap.dedent(SUITE))
        tmp = Path(tempfile.mkdtemp(prefix="vmfk-", dir="/tmp"))  # short: QEMU's socket paths
        suite = Inner(root, tmp_path / f"leases-{label}", f"10.217.{_POOL_INDEX[label] * 4}.0/22", tmp,
                      tmp_path / f"mark-{label}.json")
        made.append(suite)
        return suite

    yield make
    for suite in made:  # whatever the verdict, leave nothing running or leased
        for proc in suite.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        for mark in suite.dir.parent.glob("*.json"):  # the markers name the QEMUs
            with contextlib.suppress(OSError, ValueError, KeyError):
                wait_gone(json.loads(mark.read_text())["pid"], 5)  # PDEATHSIG is asynchronous
        gc.collect(lease_root=suite.lease_root, run_root=suite.run_root, cache_dir=suite.tmp / "cache",
                   link_names=())  # its stale leases and their bridges only; no host-wide sweep
        shutil.rmtree(suite.tmp, ignore_errors=True)


# --- checks from outside ---------------------------------------------------------


def qemu_processes_under(path: Path) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "qemu-system" in cmd and str(path) in cmd and state != "Z":
            found.append(f"{pid}: {cmd[:160]}")
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def lease_files(lease_root: Path) -> list[str]:
    host = leaseroot.host_lease_dir(lease_root)
    runs = lease_root / "runs"
    return sorted([p.name for p in host.glob("*.json")] if host.is_dir() else []) + sorted(
        [f"runs/{p.name}" for p in runs.iterdir()] if runs.is_dir() else [])


def run_dirs(suite: Inner) -> list[str]:
    root = suite.run_root
    return sorted(p.name for p in root.iterdir() if p.name not in ("kept", "leases")) if root.is_dir() else []


def network_leftovers(suite: Inner, marks: list[dict]) -> list[str]:
    """QEMU processes, TAPs, bridges and lease files of the suite's runs."""
    problems = [f"QEMU still runs: {q}" for q in qemu_processes_under(suite.tmp)]
    problems += [f"QEMU {m['pid']} of {m['name']} still runs"
                 for m in marks if m.get("pid") and alive(m["pid"])]
    now = links()
    problems += [f"TAP {m['tap']} of {m['name']} remains" for m in marks if m.get("tap") in now]
    bridges = {subnets.bridge_name(s) for s in subnets.parse_pool(suite.pool)}
    problems += [f"bridge {b} of the run remains" for b in sorted(now & bridges)]
    problems += [f"lease file {f} remains" for f in lease_files(suite.lease_root)]
    return problems


def leftovers(suite: Inner, marks: list[dict]) -> list[str]:
    """network_leftovers plus run directories."""
    return network_leftovers(suite, marks) + [f"run dir {d} remains" for d in run_dirs(suite)]


def assert_next_run_passes(suite: Inner, *args: str) -> None:
    code, out = suite.run(*args)
    assert code == 0 and "4 passed" in out, out[-5000:]
    left = leftovers(suite, [])
    assert left == [], (left, leases.list_subnet_leases(suite.lease_root), out[-3000:])


def hold_and_signal(suite: Inner, sig: int, *args: str) -> tuple[dict, int, str]:
    """Start the suite with test_victim holding its VM, signal the pytest
    process once the VM is up, and wait for the run to end."""
    proc = suite.popen("-k", "victim", *args, VMFK_FAULT="hold")
    mark = suite.wait_mark(proc)
    assert alive(mark["pid"]), "the inner test's QEMU is not running"
    os.kill(proc.pid, sig)
    code, out = finish(proc, EXIT_TIMEOUT)
    return mark, code, out


# --- (a) (b) signals to the pytest process ---------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_test_tears_everything_down(inner, sig):
    suite = inner(signal.Signals(sig).name.lower())
    mark, code, out = hold_and_signal(suite, sig)
    assert code == pytest.ExitCode.INTERRUPTED, out[-5000:]
    assert "KeyboardInterrupt" in out, out[-5000:]
    assert wait_gone(mark["pid"]), f"QEMU {mark['pid']} survived {sig!r}"
    assert leftovers(suite, [mark]) == []
    assert_next_run_passes(suite)


# --- (c) SIGKILL of an xdist worker -------------------------------------------------------


def test_sigkill_of_an_xdist_worker_the_run_goes_on_and_leaves_nothing(inner):
    suite = inner("worker")
    proc = suite.popen("-n", "2", VMFK_FAULT="hold")
    mark = suite.wait_mark(proc)
    worker = mark["test_pid"]
    assert worker != proc.pid, "the victim should run in an xdist worker"
    os.kill(worker, signal.SIGKILL)
    code, out = finish(proc, RUN_TIMEOUT)
    assert code == pytest.ExitCode.TESTS_FAILED, out[-5000:]
    assert "1 failed, 3 passed" in out, out[-5000:]
    assert "crashed" in out, out[-5000:]  # xdist names the crashed worker and its test
    assert wait_gone(mark["pid"]), f"QEMU {mark['pid']} of the killed worker survived it"
    # the controller owns the run directory the workers share: the killed worker's VM dir goes with it
    left = leftovers(suite, [mark])
    assert left == [], (left, leases.list_subnet_leases(suite.lease_root), out[-3000:])
    assert_next_run_passes(suite, "-n", "2")


# --- (d) (e) faults inside a test ---------------------------------------------------------


def test_qemu_killed_mid_test_fails_fast_and_the_next_test_passes(inner):
    suite = inner("qemu")
    code, out = suite.run("-p", "no:randomly", VMFK_FAULT="qemu")
    assert code == 0 and "4 passed" in out, out[-5000:]
    mark = json.loads(suite.mark.read_text())
    error = mark["error"]
    assert mark["elapsed"] < 15, f"exec on a dead VM took {mark['elapsed']:.1f}s to fail: {error}"
    assert f"QEMU (pid {mark['pid']})" in error and "SIGKILL" in error, error  # it says what happened
    assert leftovers(suite, [mark]) == []
    assert_next_run_passes(suite)


def test_hung_exec_times_out_and_the_next_test_passes(inner):
    suite = inner("hung")
    code, out = suite.run("-p", "no:randomly", VMFK_FAULT="hung")
    assert code == 0 and "4 passed" in out, out[-5000:]
    mark = json.loads(suite.mark.read_text())
    assert mark["error"].startswith("ExecTimeout: ['sleep', '100'] did not finish within 1"), mark
    assert mark["elapsed"] < 10, mark
    assert leftovers(suite, [mark]) == []


# --- (f) a damaged cache entry -------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link a file that is never written in place (cheap), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def test_a_truncated_snapshot_is_reported_and_rebuilt_never_restored(inner, tmp_path, vmfork_snapshot):
    suite = inner("cache")
    src_cache = vmfork_snapshot.dir.parent.parent
    image_key = vmfork_snapshot.manifest["image_key"]
    cache = tmp_path / "cache"
    src_image, image = src_cache / "images" / image_key, cache / "images" / image_key
    image.mkdir(parents=True)
    for f in src_image.iterdir():  # image files are only ever read: links are safe
        _link_or_copy(f, image / f.name)
    snap = cache / "snapshots" / vmfork_snapshot.key
    snap.mkdir(parents=True)
    _link_or_copy(vmfork_snapshot.memory_path, snap / "memory.ram")  # a rebuild writes a new file
    shutil.copy2(vmfork_snapshot.state_path, snap / "state.bin")  # a real copy: it gets truncated
    manifest = json.loads((vmfork_snapshot.dir / "manifest.json").read_text())
    for part in ("kernel", "initrd", "rootfs"):  # the manifest names the image by absolute path
        manifest["machine"][part] = manifest["machine"][part].replace(str(src_image), str(image))
    (snap / "manifest.json").write_text(json.dumps(manifest))
    if (src_cache / "probes").is_dir():  # the KVM verdict: no probe boot in the inner run
        shutil.copytree(src_cache / "probes", cache / "probes")
    size = (snap / "state.bin").stat().st_size
    os.truncate(snap / "state.bin", size // 2)
    damaged_at = time.time()

    code, out = suite.run(timeout=240, VMFORK_CACHE_DIR=str(cache))
    assert code == 0 and "4 passed" in out, out[-5000:]
    assert f"discarding damaged snapshot {vmfork_snapshot.key}" in out, out[-5000:]
    assert f"state.bin is {size // 2} bytes, manifest says {size}" in out, out[-5000:]
    assert f"snapshot {vmfork_snapshot.key}: built in" in out, out[-5000:]  # not "cache hit"
    rebuilt = json.loads((snap / "manifest.json").read_text())
    assert rebuilt["created"] > damaged_at and rebuilt["run_id"] != manifest["run_id"]
    from pytest_vmfork.vm.snapshot import verify_files

    assert verify_files(snap, rebuilt) == []
    assert not [p for p in (cache / "snapshots").iterdir() if p.name.startswith((".staging-", ".trash-"))]
    assert leftovers(suite, []) == []
    code, out = suite.run(VMFORK_CACHE_DIR=str(cache))
    assert code == 0 and "4 passed" in out and "cache hit" in out, out[-5000:]


# --- (g) vmfork gc between a dead run and a live one ---------------------------------------------


def test_gc_removes_a_dead_runs_leftovers_and_leaves_a_live_run_alone(inner, tmp_path):
    suite = inner("gc")
    dead_mark, live_mark = tmp_path / "dead.json", tmp_path / "live.json"
    # Both runs hold a VM at once (so the live one cannot reclaim the dead one's lease first).
    dead_proc = suite.popen("-k", "victim", VMFK_FAULT="hold", VMFK_MARK=str(dead_mark))
    live_proc = suite.popen("-k", "victim", VMFK_FAULT="hold", VMFK_MARK=str(live_mark))
    dead = suite.wait_mark(dead_proc, dead_mark)
    live = suite.wait_mark(live_proc, live_mark)
    os.kill(dead_proc.pid, signal.SIGKILL)  # no teardown at all
    finish(dead_proc, EXIT_TIMEOUT)
    assert wait_gone(dead["pid"]), "PDEATHSIG should have killed the dead run's QEMU"
    dead_dir, live_dir = Path(dead["run_dir"]), Path(live["run_dir"])
    assert dead_dir.is_dir() and live_dir.is_dir()
    leases_before = {d["run_id"]: d for d in leases.list_subnet_leases(suite.lease_root)}
    assert leases_before[dead["run_id"]]["stale"] and leases_before[live["run_id"]]["stale"] is None
    dead_bridge = leases_before[dead["run_id"]]["bridge"]
    live_bridge = leases_before[live["run_id"]]["bridge"]
    assert {dead_bridge, live_bridge} <= links()

    dry = suite.gc("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"would remove run-dir {dead_dir}" in dry.stdout, dry.stdout
    assert f"would remove bridge {dead_bridge}" in dry.stdout, dry.stdout
    assert dead_dir.is_dir() and dead_bridge in links()  # a dry run touches nothing

    res = suite.gc()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"removed run-dir {dead_dir}: owner pid {dead_proc.pid}" in res.stdout, res.stdout
    assert f"removed bridge {dead_bridge}" in res.stdout, res.stdout
    assert str(live_dir) not in res.stdout and live_bridge not in res.stdout, res.stdout
    assert not dead_dir.exists() and dead_bridge not in links()
    assert not (suite.lease_root / "runs" / dead["run_id"]).exists()
    # the live run is untouched: its directory, VM, QEMU, bridge and lease
    assert (live_dir / live["name"] / "handles.json").is_file() and alive(live["pid"])
    assert live_bridge in links() and live["tap"] in links()
    (lease,) = leases.list_subnet_leases(suite.lease_root)
    assert lease["run_id"] == live["run_id"] and lease["stale"] is None

    os.kill(live_proc.pid, signal.SIGINT)  # the live run still works and ends cleanly
    code, out = finish(live_proc, EXIT_TIMEOUT)
    assert code == pytest.ExitCode.INTERRUPTED, out[-5000:]
    assert leftovers(suite, [dead, live]) == []
    assert_next_run_passes(suite)
