"""vmfork_layer in real inner runs: built once across xdist workers, cached
across runs with a content key, removed at the end of a run without one."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from pytest_vmfork.cli.shell import set_window_size
from pytest_vmfork.plugin import SESSION_KEY
from pytest_vmfork.vm.layer import discard

from .suites import CONFTEST
from .test_plugin import qemu_processes_under
from .test_templates import inner_env, run_inner, short_tmp, write_suite  # noqa: F401 (short_tmp: a fixture)

LAYER_SUITE = {
    "conftest.py": CONFTEST + """
import os
from pytest_vmfork import vmfork_layer

def seed(vm):
    with open(os.environ["LAYER_BUILDS"], "a") as f:  # host side: counts the builds of all workers
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    vm.exec("echo seeded > /root/seed && sync").check()

def scratch(vm):
    vm.exec("echo scratch > /root/scratch").check()

seeded = vmfork_layer(seed, key=os.environ["LAYER_KEY"], name="seeded")
per_run = vmfork_layer(scratch)
""",
    "test_uses.py": """
import pytest

@pytest.mark.parametrize("i", range(2))
def test_forks_of_the_layer_see_its_file(vm_factory, seeded, i):
    assert vm_factory(snapshot=seeded).exec(["cat", "/root/seed"]).stdout == b"seeded\\n"

def test_a_layer_without_key_works_too(vm_factory, per_run):
    assert vm_factory(snapshot=per_run).exec(["cat", "/root/scratch"]).stdout == b"scratch\\n"
""",
}


def _entries(snapshots: Path) -> dict[str, dict]:
    """This suite's layers in the (shared) cache: other tests save layers there too."""
    out = {}
    for manifest in snapshots.glob("*/manifest.json"):
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue  # another test's entry, being removed
        if doc.get("layer") in ("seeded", "scratch"):
            out[manifest.parent.name] = doc
    return out


def test_a_keyed_layer_is_built_once_across_workers_and_reused_by_the_next_run(
    tmp_path: Path, short_tmp: Path, request  # noqa: F811
):
    snapshots = request.config.stash[SESSION_KEY].settings.cache_dir / "snapshots"
    write_suite(tmp_path, LAYER_SUITE)
    builds = tmp_path / "builds.log"
    env = {"LAYER_KEY": secrets.token_hex(8), "LAYER_BUILDS": str(builds)}
    before = set(_entries(snapshots))
    try:
        code, out = run_inner(tmp_path, short_tmp, "-n", "2", "--dist", "each", **env)
        assert code == 0 and "6 passed" in out, out[-6000:]
        assert len(builds.read_text().split()) == 1, out[-6000:]  # two workers, one build
        made = {k: v for k, v in _entries(snapshots).items() if k not in before}
        # the keyed layer stays; the run's own (no key) was removed when the run ended
        assert [(v["name"], v["ephemeral"], v["depth"]) for v in made.values()] == [("seeded", False, 1)]
        assert "saved in this run" in out and "layer 'seeded', depth 1" in out

        code, out = run_inner(tmp_path, short_tmp, "-n", "2", "-k", "see_its_file", **env)
        assert code == 0 and "2 passed" in out, out[-6000:]
        assert len(builds.read_text().split()) == 1, out[-6000:]  # cached: not built again
        (key,) = made
        assert f"snapshot {key}: cache hit" in out
    finally:
        for key in set(_entries(snapshots)) - before:
            discard(snapshots / key)


# --- --vmfork-keep-failed: a failed test's VM, saved, stepped into, collected -----------

KEPT_SUITE = {
    "conftest.py": CONFTEST,
    "test_fails.py": """
def test_writes_evidence_then_fails(vm):
    vm.exec("echo evidence-$(hostname) > /root/evidence && sync").check()
    assert False, "fails on purpose"

def test_passes(vm):
    vm.exec("echo fine > /root/evidence").check()
""",
}


def _private_cache(shared: Path, template_snapshot: Path, root: Path) -> Path:
    """A cache of its own that sees the shared images and template snapshot (hard links:
    a symlinked cache entry is refused as untrusted), so kept VMs saved and collected
    here never touch anyone else's."""
    cache = root / "cache"
    (cache / "snapshots").mkdir(parents=True)
    (cache / "images").symlink_to(shared / "images", target_is_directory=True)
    entry = cache / "snapshots" / template_snapshot.name
    entry.mkdir()
    for f in template_snapshot.iterdir():
        os.link(f, entry / f.name)
    if (shared / "probes").is_dir():
        shutil.copytree(shared / "probes", cache / "probes")
    return cache


def _vmfork(tmp: Path, cache: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The vmfork command, with the run root under ``tmp`` (TMPDIR) and the private cache."""
    argv = [sys.executable, "-m", "pytest_vmfork.cli", command, "--cache-dir", str(cache), *args]
    return subprocess.run(argv, env=inner_env(tmp), capture_output=True, text=True, timeout=300, check=False)


def test_a_failed_test_s_vm_is_kept_as_a_snapshot_that_vmfork_exec_and_shell_restore_until_gc_kept(
    tmp_path: Path, short_tmp: Path, request, vmfork_snapshot  # noqa: F811
):
    shared = request.config.stash[SESSION_KEY].settings.cache_dir
    cache = _private_cache(shared, vmfork_snapshot.dir, tmp_path)
    suite = tmp_path / "suite"
    write_suite(suite, KEPT_SUITE)
    code, out = run_inner(suite, short_tmp, "--vmfork-keep-failed", VMFORK_CACHE_DIR=str(cache))
    assert code == 1 and "1 failed, 1 passed" in out, out[-6000:]
    m = re.search(r"kept failed VM \S+ of test_fails.py::test_writes_evidence_then_fails as '([^']+)'.*"
                  r"step in with: vmfork exec --cache-dir \S+ (\S+) -- ", out)
    assert m and m[1] == m[2], out[-6000:]
    name = m[1]
    assert not qemu_processes_under(short_tmp), "a kept VM still runs after the session"

    listed = _vmfork(short_tmp, cache, "kept")
    assert listed.returncode == 0 and name in listed.stdout, listed
    assert "test_fails.py::test_writes_evidence_then_fails" in listed.stdout and "MiB" in listed.stdout
    assert "test_passes" not in listed.stdout

    res = _vmfork(short_tmp, cache, "exec", name, "--", "cat", "/root/evidence")
    assert res.returncode == 0 and res.stdout.startswith("evidence-"), res.stderr[-3000:]
    again = _vmfork(short_tmp, cache, "exec", name, "--", "sh", "-c", "cat /root/evidence; exit 3")
    assert again.returncode == 3 and again.stdout == res.stdout  # each exec forks the kept VM afresh
    assert not qemu_processes_under(short_tmp)
    missing = _vmfork(short_tmp, cache, "exec", "no-such-vm", "--", "true")
    assert missing.returncode == 2 and name in missing.stderr  # the error lists what is kept

    _drive_shell(short_tmp, cache, name)
    assert not qemu_processes_under(short_tmp), "the shell's fork outlived it"

    gc = _vmfork(short_tmp, cache, "gc", "--kept")
    assert gc.returncode == 0, gc
    assert "no kept VMs" in _vmfork(short_tmp, cache, "kept").stdout
    assert [p.name for p in (cache / "snapshots").iterdir() if p.is_dir()] == [vmfork_snapshot.key]
    kept_files = short_tmp / f"vmfork-{os.getuid()}" / "kept"
    assert not kept_files.exists() or not list(kept_files.iterdir())
    assert vmfork_snapshot.memory_path.exists()  # the shared template snapshot is untouched


def _drive_shell(tmp: Path, cache: Path, name: str) -> None:
    """`vmfork shell NAME` on a real PTY (33x101): a command, line editing, the window
    size, Ctrl-C to a guest program, and `exit 7` ending the command with status 7."""
    master, slave = pty.openpty()
    set_window_size(slave, 33, 101)
    proc = subprocess.Popen([sys.executable, "-m", "pytest_vmfork.cli", "shell", "--cache-dir", str(cache), name],
                            stdin=slave, stdout=slave, stderr=slave, env=inner_env(tmp), start_new_session=True)
    os.close(slave)
    seen = bytearray()

    def expect(text: bytes, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not on the terminal within {timeout:g}s; it shows {bytes(seen[-3000:])!r}"
            if select.select([master], [], [], min(left, 1.0))[0]:
                try:
                    seen.extend(os.read(master, 4096))
                except OSError:  # EIO: the command exited and closed the terminal
                    assert text in seen, f"{text!r} never shown; the terminal shows {bytes(seen[-3000:])!r}"

    try:
        expect(b":~# ")  # the guest shell's prompt: type only now (raw mode flushes earlier input)
        os.write(master, b"echo ready-$((2+3))\r")
        expect(b"ready-5")
        os.write(master, b"echo abX\x7fc-$((1+1))\r")  # Backspace, edited by the guest shell
        expect(b"abc-2")
        os.write(master, b"stty size\r")
        expect(b"33 101")
        os.write(master, b"python3 -c 'import time; print(\"nap\" + \"ping\", flush=True); time.sleep(300)'\r")
        expect(b"napping")
        os.write(master, b"\x03")  # Ctrl-C: SIGINT from the guest tty to the guest program
        expect(b"KeyboardInterrupt")
        os.write(master, b"echo after-$((3*3))\r")
        expect(b"after-9")
        os.write(master, b"exit 7\r")
        assert proc.wait(60) == 7
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
