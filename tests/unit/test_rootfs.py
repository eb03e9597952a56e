"""Unit tests for pytest_vmfork.build.rootfs: build modes and the mmdebstrap command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfork.build import rootfs
from pytest_vmfork.build.aptsources import AptConfig
from pytest_vmfork.errors import ConfigError


def test_subid_count_adds_up_the_ranges_of_this_user_by_name_or_uid(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\nbob:165536:65536\n1001:231072:1000\nalice:300000:10\nbroken\n")
    assert rootfs.subid_count(subuid, "alice", 1000) == 65546
    assert rootfs.subid_count(subuid, "carol", 1001) == 1000
    assert rootfs.subid_count(subuid, "dave", 1002) == 0
    assert rootfs.subid_count(tmp_path / "missing", "alice", 1000) == 0


def test_unknown_build_mode_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, root, unshare, fakechroot"):
        rootfs.choose_mode("chroot")


def test_mmdebstrap_argv_builds_minbase_with_base_and_template_packages(tmp_path: Path) -> None:
    apt = AptConfig(("deb http://m/debian bookworm main",), ('Acquire::Check-Valid-Until "false"',), "test")
    argv = rootfs.mmdebstrap_argv(
        packages=["nginx-light", "python3"], mode=rootfs.BuildMode("unshare", ""), apt=apt,
        overlay=tmp_path / "o.tar", kernel_hook=tmp_path / "k.sh", kernel_flavour="amd64",
        kernel_out=tmp_path / "kernel", out_tar=tmp_path / "root.tar")
    assert argv[:4] == ["mmdebstrap", "--variant=minbase", "--mode=unshare", "--format=tar"]
    include = next(a for a in argv if a.startswith("--include="))
    assert include.removeprefix("--include=").split(",") == [*rootfs.BASE_PACKAGES, "nginx-light"]
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in argv
    assert f"--customize-hook=tar-in {tmp_path / 'o.tar'} /" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root.tar"), "deb http://m/debian bookworm main"]


def test_root_mode_runs_mmdebstrap_in_a_mount_namespace_of_its_own(tmp_path: Path) -> None:
    apt = AptConfig(("deb http://m/debian bookworm main",), (), "test")
    argv = rootfs.mmdebstrap_argv(
        packages=[], mode=rootfs.BuildMode("root", ""), apt=apt, overlay=tmp_path / "o.tar",
        kernel_hook=tmp_path / "k.sh", kernel_flavour="amd64", kernel_out=tmp_path / "kernel",
        out_tar=tmp_path / "root.tar")
    at = argv.index("--")
    assert argv[0] == "unshare" and {"--mount", "--fork", "--kill-child"} <= set(argv[:at])
    assert argv[at + 1:at + 3] == ["mmdebstrap", "--variant=minbase"] and "--mode=root" in argv


def test_unknown_packages_are_picked_out_of_apt_errors() -> None:
    text = "E: Unable to locate package nosuch-pkg\nE: Package 'gone' has no installation candidate\n"
    assert rootfs.unknown_packages(text) == ["gone", "nosuch-pkg"]
