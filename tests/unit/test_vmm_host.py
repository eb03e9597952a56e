"""QEMU's host-side settings: the -accel value per accelerator (tb-size is TCG's alone)."""

from pathlib import Path

import pytest

from pytest_vmfork import vmm
from pytest_vmfork.vmm import MachineSpec, accel_option


def argv_of(spec: MachineSpec) -> list[str]:
    return spec.argv(workdir=Path("/w"), mem_path=Path("/m"), shared=False, incoming=True,
                     netdev=["type=hubport", "hubid=0"], mac="52:54:00:00:00:01", name="t")


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


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_machine_argv_uses_the_accel_option(accel: str) -> None:
    spec = MachineSpec(kernel=Path("/k"), initrd=Path("/i"), rootfs=Path("/r"), cmdline="c", accel=accel, vcpus=2)
    argv = argv_of(spec)
    assert argv[argv.index("-accel") + 1] == accel_option(accel, 2)


def test_tb_size_is_not_part_of_the_guest_visible_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Template and forks may differ in tb-size: only the -accel value changes."""
    spec = MachineSpec(kernel=Path("/k"), initrd=Path("/i"), rootfs=Path("/r"), cmdline="c")
    a = argv_of(spec)
    monkeypatch.setattr(vmm, "TCG_TB_SIZE_MIB", vmm.TCG_TB_SIZE_MIB * 2)
    b = argv_of(spec)
    diff = [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert len(diff) == 2  # the -accel value and the vmgenid guid (new per call)
    assert any(x.startswith("tcg") for x, _ in diff)
