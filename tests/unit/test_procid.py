"""Process identity: a PID with its start time and boot id names one process, and
every way an owner can be gone (exited, zombie, reused PID, earlier boot) is seen."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from pytest_vmfork.errors import VMForkError
from pytest_vmfork.host import procid


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: the PID no longer exists
    return proc.pid



def test_a_live_owner_is_not_stale():
    assert procid.owner_gone(os.getpid(), procid.process_start_time(os.getpid()), procid.boot_id()) is None


def test_a_dead_pid_is_stale():
    pid = dead_pid()
    assert procid.owner_gone(pid, 12345) == f"pid {pid} does not exist"


def test_a_live_pid_with_another_start_time_is_stale():
    start = procid.process_start_time(os.getpid())
    assert "was reused" in procid.owner_gone(os.getpid(), start + 1)


def test_a_zombie_is_stale():
    proc = subprocess.Popen(["true"])
    try:
        start = procid.process_start_time(proc.pid)
        deadline = time.monotonic() + 10
        while procid.proc_stat(proc.pid).state != "Z":  # exited, not reaped
            assert time.monotonic() < deadline, "child never became a zombie"
            time.sleep(0.005)
        assert procid.owner_gone(proc.pid, start) == f"pid {proc.pid} is a zombie"
    finally:
        proc.wait()


def test_another_boot_is_stale():
    start = procid.process_start_time(os.getpid())
    assert "earlier boot" in procid.owner_gone(os.getpid(), start, "not-this-boot")


def test_process_start_time_of_a_missing_process_is_an_error():
    with pytest.raises(VMForkError, match="does not exist"):
        procid.process_start_time(dead_pid())


def test_a_record_without_start_time_keeps_a_live_owner_that_started_before_it():
    assert procid.record_gone(os.getpid(), None, None, time.time()) is None


def test_a_record_without_start_time_loses_a_pid_that_started_after_it():
    why = procid.record_gone(os.getpid(), None, None, written=0.0)
    assert why is not None and "reused" in why


def test_proc_stat_reads_the_parent():
    assert procid.proc_stat(os.getpid()).ppid == os.getppid()
