"""A user's kernel, checked without booting it: what it is, its config, its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_vmfork import ConfigError, Template
from pytest_vmfork.build.kernel import MODULE_TREE_OPTIONS, REQUIRED_OPTIONS, inspect_kernel, parse_config
from pytest_vmfork.build.modtree import ModuleTree


def fake_bzimage(path: Path, release: str = "6.6.0-mine") -> Path:
    """A bzImage header with a version string (no payload): enough to identify one."""
    data = bytearray(0x400)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x100).to_bytes(2, "little")  # kernel_version: offset from 0x200
    data[0x300:0x300 + len(release) + 20] = f"{release} (me@box) #1\0".encode().ljust(len(release) + 20, b"\0")
    path.write_bytes(bytes(data))
    return path


def full_config(**overrides: str) -> str:
    options = {o: "y" for o, _, _ in (*REQUIRED_OPTIONS, *MODULE_TREE_OPTIONS)} | overrides
    return "".join(f"{k}={v}\n" if v != "n" else f"# {k} is not set\n" for k, v in options.items())


def test_a_file_that_is_not_a_kernel_is_a_config_error_at_template_creation(tmp_path):
    (tmp_path / "notes.txt").write_text("not a kernel\n" * 100)
    with pytest.raises(ConfigError, match=r"is not a Linux x86-64 kernel image .*pass arch/x86/boot/bzImage"):
        Template(kernel=tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="is not a file"):
        Template(kernel=tmp_path / "missing")


def test_kernel_with_another_flavour_or_modules_without_kernel_is_a_config_error(tmp_path):
    k = fake_bzimage(tmp_path / "bzImage")
    with pytest.raises(ConfigError, match=r"kernel= and kernel_flavour='cloud-amd64' exclude each other"):
        Template(kernel=k, kernel_flavour="cloud-amd64")
    with pytest.raises(ConfigError, match="kernel_modules= needs kernel="):
        Template(kernel_modules=tmp_path)
    with pytest.raises(ConfigError, match="not one string"):
        Template(modules="veth")
    with pytest.raises(ConfigError, match="is not a kernel module name"):
        Template(modules=["veth; reboot"])


def test_changing_a_user_kernels_bytes_changes_the_image_key_and_not_the_debian_roots(tmp_path):
    k = fake_bzimage(tmp_path / "bzImage")
    template = Template(kernel=k)
    image, snapshot = template.image_spec().key(), template.snapshot_key(accel="tcg", qemu_version="q")
    k.write_bytes(k.read_bytes() + b"rebuilt")  # keys hash the file's content when computed
    assert template.image_spec().key() != image != Template().image_spec().key()
    assert template.snapshot_key(accel="tcg", qemu_version="q") != snapshot


def test_module_names_shape_the_snapshot_key_and_not_the_image_key():
    plain, loaded = Template(), Template(modules=["veth"])
    assert plain.image_spec().key() == loaded.image_spec().key()
    assert plain.snapshot_key(accel="tcg", qemu_version="q") != loaded.snapshot_key(accel="tcg", qemu_version="q")


def test_config_read_beside_the_kernel_names_each_missing_option(tmp_path):
    k = fake_bzimage(tmp_path / "bzImage")
    assert inspect_kernel(k).problems(with_modules=False)[0].startswith(f"kernel {k}: cannot check its config")
    (tmp_path / "config-6.6.0-mine").write_text(full_config(CONFIG_VMGENID="n", CONFIG_VIRTIO_NET="m"))
    uk = inspect_kernel(k)
    assert uk.release == "6.6.0-mine" and uk.config_source.endswith("config-6.6.0-mine")
    problems = uk.problems(with_modules=False)
    assert any("CONFIG_VIRTIO_NET=m but no kernel_modules= was given" in p for p in problems)
    assert any("CONFIG_VMGENID is not set" in p and "/dev/urandom" in p for p in problems)
    assert [p for p in uk.problems(with_modules=True) if "VIRTIO_NET" in p] == []


def test_config_of_the_source_tree_is_found_from_arch_x86_boot(tmp_path):
    (tmp_path / "arch/x86/boot").mkdir(parents=True)
    k = fake_bzimage(tmp_path / "arch/x86/boot/bzImage")
    (tmp_path / ".config").write_text(full_config())
    uk = inspect_kernel(k)
    assert uk.config_source == str(tmp_path / ".config") and uk.problems(with_modules=True) == []


def test_parse_config_skips_unset_options_and_unquotes_strings():
    assert parse_config('CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\n') == {"CONFIG_A": "y", "CONFIG_C": "x y"}


def test_unknown_module_name_suggests_the_closest_one():
    tree = ModuleTree("k", Path("/x"), "6.1.0", frozenset({"veth", "nf_tables", "bridge"}), {})
    tree.require(["veth", "nf-tables"])  # "-" and "_" alike, as modprobe
    with pytest.raises(ConfigError, match=r"kernel 6.1.0 has no module 'vethh'; did you mean 'veth'\?"):
        tree.require(["bridge", "vethh"])
    with pytest.raises(ConfigError, match=r"no module 'zzzzzz'; check the name"):
        tree.require(["zzzzzz"])
