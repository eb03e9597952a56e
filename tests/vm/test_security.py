"""Confinement with real VMs: QEMU's seccomp filter, private VM directories
(a real second user is refused), and a hostile guest that floods what it sends
the host (exec output, the event channel) without hurting the host or the
next fork."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.templates import TEST_TEMPLATE
from pytest_vmfork import ConfigError, RestoreError, Run, fork
from pytest_vmfork.host import confine, private
from pytest_vmfork.vm.layer import discard
from pytest_vmfork.vm.registry import snapshot_for

#: The stated bound: the test process's peak RSS grows by less than this while a
#: guest prints 2 GiB (8 MiB per stream are kept; the reply is a copy or two).
RSS_BOUND_MIB = 100

#: A guest program that takes a dup of the agent's event-channel fd
#: (pidfd_getfd: the port itself opens only once) and writes argv[1] to it:
#: "line" = one 100 MiB line, "flood" = a stream of short well-formed lines.
GRAB_EVT = r'''
import ctypes, os, sys
name = {open(f"/sys/class/virtio-ports/{p}/name").read().strip(): p for p in os.listdir("/sys/class/virtio-ports")}
dev = "/dev/" + name["org.vmfork.evt"]
libc = ctypes.CDLL(None, use_errno=True)
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        continue
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == dev:
                pidfd = os.pidfd_open(int(pid))
                evt = libc.syscall(438, pidfd, int(fd), 0)  # pidfd_getfd
                assert evt >= 0, ctypes.get_errno()
                if sys.argv[1] == "line":
                    chunk = b"x" * (1 << 20)
                    for _ in range(100):
                        os.write(evt, chunk)
                else:
                    line = b"vmfork-evt event=noise\n" * 1000
                    for _ in range(1000):
                        os.write(evt, line)
                sys.exit(0)
        except OSError:
            continue
sys.exit("no process holds the event port")
'''


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_kib(field: str) -> int:
    """VmRSS or VmHWM (peak) of this test process, in KiB."""
    return int(status(os.getpid())[field].split()[0])


def reset_peak_rss() -> int:
    """Start a new peak (VmHWM := VmRSS: clear_refs 5) and return the current RSS in KiB;
    the worker may have peaked higher in an earlier test."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kib("VmRSS")


def test_every_fork_runs_under_qemus_seccomp_filter(vm):
    st = status(vm.pid)
    assert st["Seccomp"] == "2", f"QEMU pid {vm.pid} runs without a seccomp filter: {st['Seccomp']}"
    assert "-sandbox" in Path(f"/proc/{vm.pid}/cmdline").read_bytes().decode(errors="replace")
    assert vm.exec(["true"]).returncode == 0


def test_a_second_user_cannot_reach_a_root_forks_channels(vm, other_user):
    # QMP and the event and control channels are socketpairs: no socket file exists
    # for anyone to connect to, and the VM dir itself is private.
    assert not [p for p in vm.dir.rglob("*") if p.is_socket()]
    probe = subprocess.run(
        ["setpriv", f"--reuid={other_user.uid}", f"--regid={other_user.gid}", "--clear-groups", "--",
         "/usr/bin/python3", "-c", "import os, sys; os.listdir(sys.argv[1])", str(vm.dir)],
        capture_output=True, text=True, timeout=30, check=False)
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    assert vm.exec(["true"]).returncode == 0


def assert_confined(pid: int, uid: int | None = None) -> None:
    """QEMU ``pid`` runs under its seccomp filter as an unprivileged user (``uid`` if
    given): real, effective, saved and filesystem uid and gid, and no root group."""
    st = status(pid)
    assert st["Seccomp"] == "2", f"QEMU pid {pid} runs without a seccomp filter: {st['Seccomp']}"
    uids, gids = st["Uid"].split(), st["Gid"].split()
    assert len(set(uids)) == 1 and uids[0] != "0", f"QEMU pid {pid} runs with uids {uids}"
    assert len(set(gids)) == 1 and gids[0] != "0", f"QEMU pid {pid} runs with gids {gids}"
    assert "0" not in st["Groups"].split(), f"QEMU pid {pid} keeps the root group: {st['Groups']!r}"
    assert st["NoNewPrivs"] == "1"
    if uid is not None:
        assert uids[0] == str(uid)


def test_a_root_runs_qemu_runs_as_an_unprivileged_user_and_opens_no_path_of_ours(vm):
    assert_confined(vm.pid, pwd.getpwnam(confine.DEFAULT_USER).pw_uid)
    assert vm.exec(["true"]).returncode == 0  # it works: every file and socket came as a descriptor
    # the guest RAM file is the snapshot's, mapped privately: writable by QEMU's group, nobody else
    ram = vm.forked_from.memory_path.stat()
    assert ram.st_gid == grp.getgrnam(confine.RAM_GROUP).gr_gid and stat.S_IMODE(ram.st_mode) & 0o022 == 0o020
    private.verify_cache_entry(vm.forked_from.dir, ram_gid=ram.st_gid)
    with pytest.raises(private.PrivateDirError, match="memory.ram is writable by someone else"):
        private.verify_cache_entry(vm.forked_from.dir)
    # QEMU cannot reach the VM directory it would otherwise have opened files in
    probe = subprocess.run(["setpriv", f"--reuid={status(vm.pid)['Uid'].split()[0]}", "--clear-groups",
                            f"--regid={status(vm.pid)['Gid'].split()[0]}", "--", "ls", str(vm.dir)],
                           capture_output=True, text=True, timeout=30, check=False)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr


def test_a_template_boots_qemu_runs_unprivileged_too(tmp_path):
    # a snapshot of its own (a warm-up no other template has): booted now, its QEMU
    # inspected while the warm-up runs, then discarded
    seen: list[int] = []

    def progress(message: str) -> None:
        if message.startswith("vmfork: warm-up:"):
            seen.extend(qemu_children())
            for pid in seen:
                assert_confined(pid)

    template = dataclasses.replace(TEST_TEMPLATE, warmup=[*TEST_TEMPLATE.warmup, f"echo {secrets.token_hex(8)}"])
    run = Run()
    try:
        snap = snapshot_for(template, run=run, progress=progress)
    finally:
        run.remove()
    try:
        assert seen and len(set(seen)) == 1 and not snap.cache_hit  # one QEMU, seen at each warm-up
    finally:
        discard(snap)


def qemu_children() -> list[int]:
    """PIDs of QEMUs whose parent is this process (a template boot's)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = status(int(pid))
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if st["PPid"] == str(os.getpid()) and b"qemu-system" in cmd and b"vmfork-t" in cmd:
            found.append(int(pid))
    return found


def test_a_configured_qemu_user_is_honoured_for_forks(vmfork_snapshot, other_user):
    before = vmfork_snapshot.memory_path.stat()
    run = Run(qemu_user=other_user.name)
    try:
        with fork(vmfork_snapshot, run=run) as vm:
            assert_confined(vm.pid, other_user.uid)
            # the RAM file's group is vmfork-qemu's whoever QEMU runs as: a supplementary group
            assert str(grp.getgrnam(confine.RAM_GROUP).gr_gid) in status(vm.pid)["Groups"].split()
            assert vm.exec(["echo", "ok"]).stdout == b"ok\n"
    finally:
        run.remove()
    after = vmfork_snapshot.memory_path.stat()
    assert (after.st_gid, after.st_mode) == (before.st_gid, before.st_mode)  # the cache did not change hands


def test_a_qemu_user_that_does_not_exist_is_refused_before_any_vm_starts():
    with pytest.raises(ConfigError, match="vmfork qemu user 'vmfork-nosuchuser' does not exist; create it"):
        Run(qemu_user="vmfork-nosuchuser")
    with pytest.raises(ConfigError, match="is not a user name"):
        Run(qemu_user="../etc")


def test_a_guest_printing_2_gib_is_truncated_with_a_marker_and_host_memory_stays_bounded(vm):
    before = reset_peak_rss()
    res = vm.exec("dd if=/dev/zero bs=1M count=2048 2>/dev/null; echo err >&2", timeout=600)
    grown = (rss_kib("VmHWM") - before) / 1024
    assert res.returncode == 0
    assert res.stdout.startswith(b"\0" * 1024) and res.stdout_dropped == 2 * 1024**3 - 8 * 1024**2
    assert res.stdout.endswith(b"[vmfork: stdout truncated at 8388608 bytes (output_limit); "
                               b"2139095040 more bytes dropped]\n")
    assert res.stderr == b"err\n" and res.stderr_dropped == 0
    assert grown < RSS_BOUND_MIB, f"the host grew by {grown:.0f} MiB"


def test_exec_output_limit_is_configurable_per_exec(vm):
    res = vm.exec("seq 100000", output_limit=1000)
    assert res.stdout.startswith(b"1\n2\n3\n") and res.stdout_dropped == len(
        "".join(f"{i}\n" for i in range(1, 100001))) - 1000
    assert b"[vmfork: stdout truncated at 1000 bytes" in res.stdout[1000:]
    with pytest.raises(ValueError, match="output_limit=0"):
        vm.exec(["true"], output_limit=0)


@pytest.mark.parametrize("attack, why", [
    ("line", "the guest sent an event line longer than 4096 bytes"),
    ("flood", "the guest flooded the event channel"),
])
def test_a_guest_abusing_the_event_channel_fails_its_own_fork_only(vm_factory, attack, why):
    bystander, victim = vm_factory(), vm_factory()
    victim.exec(["sh", "-c", "cat > /tmp/grab.py"], input=GRAB_EVT).check()
    before = reset_peak_rss()
    with pytest.raises(RestoreError, match=why) as err:
        victim.exec(["python3", "/tmp/grab.py", attack], timeout=120)
    assert "killed by signal 9" in str(err.value)
    assert (rss_kib("VmHWM") - before) / 1024 < RSS_BOUND_MIB
    assert not victim.alive()
    assert bystander.exec(["true"]).returncode == 0
    assert vm_factory().exec(["echo", "next"]).stdout == b"next\n"


def test_a_guest_flooding_its_serial_console_is_bounded_by_the_log_limit(vmfork_snapshot, vm_factory, monkeypatch):
    limit = 100_000  # the default is 8 MiB; the guest's serial port writes ~200 KB/s under TCG
    monkeypatch.setattr(sys.modules["pytest_vmfork.vm.restore"], "FORK_FILE_LIMIT", limit)
    with fork(vmfork_snapshot) as victim:  # not from the warm pool: spawned with this limit
        try:
            victim.exec("head -c 300000 /dev/zero > /dev/ttyS0", timeout=120)
        except RestoreError as exc:  # the write hit a QEMU thread that takes SIGXFSZ: the fork fails, naming it
            assert f"SIGXFSZ): its console log reached the limit of {limit} bytes" in str(exc)
        else:  # the usual case: QEMU's vCPU thread blocks SIGXFSZ, the write fails, the output is dropped
            assert victim.exec(["true"]).returncode == 0
            assert victim.console_tail().endswith(f"[vmfork: the console log reached its limit of {limit} "
                                                  "bytes; later console output was dropped]")
            assert (victim.dir / "console.log").stat().st_size == limit
    assert vm_factory().exec(["echo", "next"]).stdout == b"next\n"
