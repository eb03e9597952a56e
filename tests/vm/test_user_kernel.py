"""A kernel of the user's own: Debian's kernel handed in as one (bzImage, .config and a
``make modules_install`` tree), booted and forked; its refusals; its image key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fixtures.kernels import debian_kernel_build
from pytest_vmfork import ConfigError, Template
from pytest_vmfork.build.image import ImageSpec, build_image
from pytest_vmfork.cli.doctor import check_kernel
from pytest_vmfork.config import default_cache_dir

pytestmark = pytest.mark.vm


def _cache() -> Path:
    return Path(os.environ.get("VMFORK_CACHE_DIR") or default_cache_dir())


@pytest.fixture(scope="module")
def kernel_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's kernel of the stock image, laid out as a kernel build tree."""
    return debian_kernel_build(build_image(Template().image_spec(), _cache()), tmp_path_factory.mktemp("linux"))


def _template(build: Path, **kw) -> Template:
    return Template(kernel=build / "arch/x86/boot/bzImage", kernel_modules=build / "mods", **kw)


def test_debian_kernel_handed_in_as_a_user_kernel_forks_with_its_modules(kernel_build, vm_factory):
    release = next((kernel_build / "mods/lib/modules").iterdir()).name
    vm = vm_factory(template=_template(kernel_build, modules=["veth"]))
    assert vm.exec(["uname", "-r"]).stdout.decode().strip() == release
    assert "veth" in vm.exec("lsmod").stdout.decode()
    assert vm.exec("modprobe dummy && ip link add d0 type dummy && ip link show d0").returncode == 0
    assert check_kernel(_template(kernel_build), _cache()).ok


def test_rebuilt_user_kernel_changes_its_image_and_snapshot_keys_and_rebuilds_no_debian_root(kernel_build, tmp_path):
    build = tmp_path / "linux"
    shutil.copytree(kernel_build, build, symlinks=True)
    after = _template(build)
    image, snapshot = after.image_spec().key(), after.snapshot_key(accel="tcg", qemu_version="q")
    with open(build / "arch/x86/boot/bzImage", "ab") as f:  # "rebuilt": other bytes, same tree
        f.write(b"\0" * 4096)
    assert after.image_spec().key() != image
    assert after.snapshot_key(accel="tcg", qemu_version="q") != snapshot
    root = ImageSpec(packages=after.packages).key()  # the Debian root: keyed without the kernel
    said: list[str] = []
    img = build_image(after.image_spec(), _cache(), progress=said.append)
    assert img.manifest["root_key"] == root and img.manifest["stage_seconds"].get("debian_root_cached") is not None
    assert not [line for line in said if "building guest image root" in line or "building module tree" in line]
    assert img.manifest["kernel"]["modules_built"] is False  # the same tree: its squashfs is reused


@pytest.mark.parametrize("option", ["CONFIG_VIRTIO_BLK", "CONFIG_VMGENID", "CONFIG_OVERLAY_FS"])
def test_kernel_whose_config_lacks_an_option_is_refused_naming_it_before_anything_is_built(
        kernel_build, tmp_path, option):
    build = tmp_path / "linux"
    shutil.copytree(kernel_build, build, symlinks=True)
    config = (build / ".config").read_text()
    assert f"\n{option}=" in config
    (build / ".config").write_text(config.replace(f"\n{option}=", f"\n# {option} is not set\n#="))
    template = _template(build)
    said: list[str] = []
    with pytest.raises(ConfigError, match=rf"{option} is not set, a fork needs .*: set {option}=y"):
        build_image(template.image_spec(), tmp_path / "cache", progress=said.append)
    assert said == [] and not list((tmp_path / "cache" / "images").glob(".staging-*"))  # nothing built
    verdict = check_kernel(template, _cache())
    assert not verdict.ok and option in verdict.detail


def test_module_built_as_m_without_a_module_tree_is_refused(kernel_build):
    template = Template(kernel=kernel_build / "arch/x86/boot/bzImage")
    with pytest.raises(ConfigError, match=r"CONFIG_VIRTIO_PCI=m but no kernel_modules= was given"):
        build_image(template.image_spec(), _cache())
