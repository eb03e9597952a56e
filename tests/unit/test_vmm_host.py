"""QEMU's host-side settings: the -accel value per accelerator (tb-size is TCG's alone)."""

from pytest_vmfork.vm import vmm
from pytest_vmfork.vm.vmm import accel_option


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
