"""QEMU's host side: the -accel value per accelerator (tb-size is TCG's alone), and the
errors of the QEMU process and its QMP monitor (a real QEMU with no machine; no VM)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp import QMPError

from pytest_vmfork.errors import QemuTimeout, RestoreError
from pytest_vmfork.vm import qmploop, vmm
from pytest_vmfork.vm.monitor import Monitor
from pytest_vmfork.vm.procmem import ProcMem
from pytest_vmfork.vm.vmm import QEMU_BINARY, accel_option


def test_tcg_gets_a_bounded_translation_buffer() -> None:
    assert 0 < vmm.TCG_TB_SIZE_MIB < 1024  # QEMU 7.2's own default is 1 GiB
    assert accel_option("tcg", 1) == f"tcg,tb-size={vmm.TCG_TB_SIZE_MIB}"
    assert accel_option("tcg", 4) == f"tcg,thread=multi,tb-size={vmm.TCG_TB_SIZE_MIB}"
    assert accel_option("tcg", 1, tb_size_mib=32) == "tcg,tb-size=32"


def test_tb_size_zero_keeps_qemus_default() -> None:
    assert accel_option("tcg", 1, tb_size_mib=0) == "tcg"
    assert accel_option("tcg", 2, tb_size_mib=0) == "tcg,thread=multi"


def test_kvm_gets_no_tcg_options() -> None:
    assert accel_option("kvm", 1) == "kvm"
    assert accel_option("kvm", 8) == "kvm"


# --- errors of the QEMU process and its monitor: every one a VMForkError ----------------


def test_a_bound_that_expires_on_the_loop_is_a_qemu_timeout_naming_the_call() -> None:
    with pytest.raises(QemuTimeout, match=r"QMP stop on vm-1 did not finish within 0.05s") as err:
        qmploop.run(asyncio.sleep(10), 0.05, what="QMP stop on vm-1")
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, RestoreError)

    async def own_timeout() -> None:
        raise TimeoutError("the coroutine's own")

    with pytest.raises(TimeoutError, match="the coroutine's own") as err2:  # not the bound: passed through
        qmploop.run(own_timeout(), 10)
    assert not isinstance(err2.value, QemuTimeout)


def test_the_memory_of_a_qemu_that_is_gone_is_a_restore_error(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    with pytest.raises(RestoreError, match=f"QEMU pid {gone.pid}: cannot read its memory map"):
        ProcMem(gone.pid, tmp_path / "memory.ram")


Qemu = tuple[Monitor, "subprocess.Popen[bytes]"]


@pytest.fixture
def monitor() -> Iterator[Qemu]:
    """A real QEMU with no machine (it starts in milliseconds) and its QMP monitor."""
    if shutil.which(QEMU_BINARY) is None:
        pytest.skip(f"{QEMU_BINARY} is not installed")
    ours, theirs = socket.socketpair()
    argv = [QEMU_BINARY, "-machine", "none", "-nodefaults", "-display", "none",
            "-chardev", f"socket,id=qmp,fd={theirs.fileno()}", "-mon", "chardev=qmp,mode=control"]
    proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
    theirs.close()
    mon = Monitor("unit")
    try:
        assert qmploop.run(mon.accept(ours, 20, gone=lambda: proc.poll() is not None))
        yield mon, proc
    finally:
        proc.kill()
        proc.wait()
        qmploop.run(mon.disconnect())


def test_a_command_qemu_refuses_is_a_restore_error_naming_it(monitor: Qemu) -> None:
    mon, _ = monitor
    assert mon.run_state() == "running"
    refused = "QEMU for unit: QMP no-such-command failed: The command no-such-command has not been found"
    with pytest.raises(RestoreError, match=refused) as err:
        mon.cmd("no-such-command")
    assert isinstance(err.value.__cause__, QMPError)  # qemu.qmp's error is chained, never raised


def test_a_migration_that_does_not_end_in_time_is_a_qemu_timeout(monitor: Qemu) -> None:
    mon, _ = monitor
    with pytest.raises(QemuTimeout, match="the migration of unit did not finish within 0.2s"):
        mon.wait_migration(0.2)  # none was started: no MIGRATION event comes


def test_a_command_to_a_qemu_that_exited_is_a_restore_error(monitor: Qemu) -> None:
    mon, proc = monitor
    proc.kill()
    proc.wait()
    with pytest.raises(RestoreError, match="QEMU for unit: QMP query-status failed"):
        mon.cmd("query-status")


def test_a_device_state_file_that_cannot_be_opened_is_a_restore_error(
        monitor: Qemu, tmp_path: Path) -> None:
    mon, _ = monitor
    with pytest.raises(RestoreError, match=f"cannot open the device state file {tmp_path}/state.bin"):
        mon.migrate_from_file(tmp_path / "state.bin")
