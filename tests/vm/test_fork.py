"""End-to-end: real QEMU forks of a real snapshot (TCG on CI)."""

import os
import time

import pytest

from pytest_vmfork import ConfigError, ExecTimeout, StateError, fork


def test_fork_runs_commands_and_returns_exit_status_and_output(vm):
    res = vm.exec(["uname", "-r"])
    assert res.returncode == 0 and res.stdout.strip().startswith(b"6.1")
    assert vm.exec(["sh", "-c", "echo oops >&2; exit 3"]).returncode == 3
    assert vm.exec(["sh", "-c", "echo oops >&2; exit 3"]).stderr == b"oops\n"
    assert vm.exec(["cat"], input=b"piped").stdout == b"piped"
    assert vm.exec("echo $GREETING", env={"GREETING": "hi"}).stdout == b"hi\n"
    assert vm.exec(["pwd"], cwd="/tmp").stdout == b"/tmp\n"


def test_missing_program_returns_127_like_a_shell(vm):
    res = vm.exec(["/no/such/program"])
    assert res.returncode == 127 and b"/no/such/program" in res.stderr


def test_template_files_and_warmup_are_in_every_fork(vm):
    assert vm.exec(["hello"]).stdout.startswith(b"hello from")
    assert vm.exec(["cat", "/root/warmup-done"]).stdout == b"warmed\n"


def test_file_written_in_one_fork_is_absent_in_the_next(vm_factory):
    first = vm_factory()
    assert first.exec("echo mine > /root/scratch && sync").returncode == 0
    second = vm_factory()
    assert second.exec(["test", "-e", "/root/scratch"]).returncode == 1
    assert first.exec(["cat", "/root/scratch"]).stdout == b"mine\n"


def test_forks_read_different_random_bytes_than_each_other_and_the_template(vm_factory):
    a, b = vm_factory(), vm_factory()
    read = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
    ra, rb = a.exec(read).stdout, b.exec(read).stdout
    template = a.exec(["cat", "/root/template-random"]).stdout
    assert len(ra) == 64 and ra != rb
    assert template not in (ra, rb)
    # getrandom() right after resume, before any other activity, differs too.
    py = "import os; print(os.getrandom(16).hex())"
    assert a.exec(["python3", "-c", py]).stdout != b.exec(["python3", "-c", py]).stdout


def test_guest_clock_is_set_from_the_host_on_resume(vm):
    guest = int(vm.exec(["date", "+%s"]).stdout)
    assert abs(guest - time.time()) < 10


def test_timings_report_restore_to_healthy_and_stages(vm):
    t = vm.timings
    if t.get("pooled"):  # spawned and loaded ahead of the request by the warm pool
        assert t["spawn_ms"] == t["load_ms"] == 0.0 and t["prepare_ms"] > 0
    else:
        assert 0 < t["spawn_ms"] <= t["load_ms"]
    assert t["load_ms"] <= t["resume_ms"] <= t["guest_ready_ms"] <= t["restore_to_healthy_ms"]
    assert t["mailbox_path"] == "direct"


def test_exec_timeout_kills_the_program_and_raises(vm):
    with pytest.raises(ExecTimeout, match="did not finish within 1"):
        vm.exec(["sleep", "30"], timeout=1)
    assert vm.exec(["true"]).returncode == 0  # the VM is still usable


def test_vm_process_and_files_are_gone_after_close(vmfork_snapshot):
    with fork(vmfork_snapshot) as machine:
        pid, workdir = machine.pid, machine.dir
        assert os.path.exists(f"/proc/{pid}") and workdir.exists()
    assert not os.path.exists(f"/proc/{pid}")
    assert not workdir.exists()
    with pytest.raises(StateError, match=r"cannot exec: VM '[^']+' is closed; exec needs running"):
        machine.exec(["true"])


def test_bad_exec_arguments_are_rejected_before_reaching_the_guest(vm):
    with pytest.raises(ConfigError, match="non-empty list"):
        vm.exec([])
    with pytest.raises(ConfigError, match="positive number"):
        vm.exec(["true"], timeout=0)


def test_warm_pool_forks_skip_spawn_and_load_and_close_cleanly(vmfork_snapshot):
    from pytest_vmfork import Run
    from pytest_vmfork.vm.pool import WarmPool

    run = Run()
    pool = WarmPool(vmfork_snapshot, run, None, size=1)
    try:
        deadline = time.monotonic() + 60
        while not pool.ready_pids() and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded wait for the background fill in this test only
        with fork(vmfork_snapshot, run=run, pool=pool) as warm:
            assert warm.timings["pooled"] is True and warm.timings["spawn_ms"] == 0.0
            assert warm.exec(["true"]).returncode == 0
        pooled_pid = None
        deadline = time.monotonic() + 60
        while not pool.ready_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        pooled_pid = pool.ready_pids()[0]
    finally:
        pool.close()
        run.remove()
    assert pooled_pid and not os.path.exists(f"/proc/{pooled_pid}")
