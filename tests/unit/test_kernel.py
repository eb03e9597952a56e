"""Unit tests for pytest_vmfork.build.kernel: module order, initramfs archive, ELF extraction, .deb unpacking."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import struct
import tarfile
from pathlib import Path

import pytest

from pytest_vmfork.build import kernel
from pytest_vmfork.build.kernel import extract_vmlinux, module_load_order, newc_archive, parse_modules_dep
from pytest_vmfork.errors import ImageBuildError

# --- kernel modules ------------------------------------------------------------------

MODULES_DEP = """\
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/squashfs/squashfs.ko:
"""


def test_parse_modules_dep_normalizes_names() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["virtio_rng"][0] == "kernel/drivers/char/hw_random/virtio-rng.ko"
    assert deps["ext4"][1] == ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko"]


def test_module_order_puts_dependencies_first_once() -> None:
    order = module_load_order(MODULES_DEP, kernel.KERNEL_MODULES)
    assert len(order) == len(set(order)) == 18
    pos = {p: i for i, p in enumerate(order)}
    for path, deps in parse_modules_dep(MODULES_DEP).values():
        if path in pos:
            assert all(pos[d] < pos[path] for d in deps), path
    assert order[:5] == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                         "kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "kernel/drivers/virtio/virtio.ko",
                         "kernel/drivers/virtio/virtio_pci.ko"]


def test_module_order_follows_transitive_dependencies() -> None:
    order = module_load_order(MODULES_DEP, ["virtio_net"])
    assert order == ["kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio.ko",
                     "kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
                     "kernel/drivers/net/virtio_net.ko"]


def test_module_order_skips_builtin_modules() -> None:
    dep = MODULES_DEP.replace("kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko\n", "")
    order = module_load_order(dep, ["crc32c-generic", "ext4", "overlay"],
                              builtin=["kernel/fs/ext4/ext4.ko", "kernel/crypto/crc32c_generic.ko"])
    assert order == ["kernel/fs/overlayfs/overlay.ko"]


def test_module_order_reports_missing_and_cycles() -> None:
    with pytest.raises(ImageBuildError, match="'vsock'"):
        module_load_order(MODULES_DEP, ["vsock"])
    with pytest.raises(ImageBuildError, match="cycle"):
        module_load_order("a.ko: b.ko\nb.ko: a.ko\n", ["a"])


def test_modules_dep_from_modinfo(tmp_path: Path) -> None:
    (tmp_path / "kernel/fs").mkdir(parents=True)
    (tmp_path / "kernel/fs/a.ko").write_bytes(b"\x7fELF junk\0license=GPL\0depends=b,c-d\0vermagic=6.1\0")
    (tmp_path / "kernel/fs/b.ko").write_bytes(b"\x7fELF\0depends=\0")
    (tmp_path / "kernel/c-d.ko").write_bytes(b"\x7fELF\0depends=\0")
    dep = kernel.modules_dep_from_modinfo(tmp_path)
    assert module_load_order(dep, ["a"]) == ["kernel/fs/b.ko", "kernel/c-d.ko", "kernel/fs/a.ko"]


# --- initramfs archive and kernel extraction ------------------------------------------

def parse_newc(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    out, pos = [], 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        name_end = pos + 110 + f[11]
        name = data[pos + 110:name_end - 1].decode()
        start = name_end + (-name_end % 4)
        body = data[start:start + f[6]]
        pos = start + f[6] + (-(start + f[6]) % 4)
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, f[1], body, f[9], f[10]))


def test_newc_archive_adds_parents_first_and_device_nodes() -> None:
    import os
    entries = [("dev/console", 0o20600, b"", os.makedev(5, 1)), ("lib/modules/6.1/kernel/a.ko", 0o100644, b"abc", 0),
               ("bin/sh", 0o120777, b"busybox", 0), ("lib", 0o40755, b"", 0)]
    got = parse_newc(newc_archive(entries))
    names = [g[0] for g in got]
    assert names == ["dev", "dev/console", "lib", "lib/modules", "lib/modules/6.1", "lib/modules/6.1/kernel",
                     "lib/modules/6.1/kernel/a.ko", "bin", "bin/sh"]
    by = {g[0]: g for g in got}
    assert by["dev/console"][1:] == (0o20600, b"", 5, 1)
    assert by["lib/modules/6.1/kernel/a.ko"][2] == b"abc"
    assert by["bin/sh"][2] == b"busybox"
    assert gzip.decompress(gzip.compress(newc_archive(entries), mtime=0)) == newc_archive(entries)


def fake_bzimage(payload: bytes, size: int) -> bytes:
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    blob = payload + size.to_bytes(4, "little")
    struct.pack_into("<II", head, 0x248, 16, len(blob))
    return bytes(head) + b"\0" * 16 + blob + b"trailing"


def test_extract_vmlinux_xz_and_gzip() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    assert extract_vmlinux(fake_bzimage(lzma.compress(elf), len(elf))) == elf
    assert extract_vmlinux(fake_bzimage(gzip.compress(elf), len(elf))) == elf
    assert extract_vmlinux(fake_bzimage(lzma.compress(elf), len(elf) + 1)) is None  # size mismatch
    assert extract_vmlinux(fake_bzimage(b"unknown-format", 3)) is None
    assert extract_vmlinux(b"MZ" + bytes(1000)) is None



def make_deb(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """A minimal .deb: an ar archive with debian-binary, control.tar.xz and data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    out = bytearray(b"!<arch>\n")
    for name, content in [("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", data.getvalue())]:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode()
        out += content + (b"\n" if len(content) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def test_unpack_deb_writes_only_the_wanted_trees(tmp_path: Path) -> None:
    deb = make_deb(tmp_path / "k.deb", {
        "./boot/vmlinuz-6.1.0-1-amd64": b"kernel",
        "./lib/modules/6.1.0-1-amd64/kernel/fs/ext4.ko": b"ko",
        "./usr/share/doc/linux/changelog": b"docs",
    }, symlinks={"./lib/modules/6.1.0-1-amd64/build": "/usr/src/linux"})
    kernel.unpack_deb(deb, tmp_path / "out")
    assert (tmp_path / "out/boot/vmlinuz-6.1.0-1-amd64").read_bytes() == b"kernel"
    assert (tmp_path / "out/lib/modules/6.1.0-1-amd64/kernel/fs/ext4.ko").read_bytes() == b"ko"
    assert os.readlink(tmp_path / "out/lib/modules/6.1.0-1-amd64/build") == "/usr/src/linux"
    assert not (tmp_path / "out/usr").exists()


def test_unpack_deb_refuses_members_outside_its_root(tmp_path: Path) -> None:
    deb = make_deb(tmp_path / "k.deb", {"./boot/../../escape": b"x"})
    with pytest.raises(ImageBuildError, match="outside its root"):
        kernel.unpack_deb(deb, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_unpack_deb_names_a_file_that_is_not_a_package(tmp_path: Path) -> None:
    (tmp_path / "bad.deb").write_bytes(b"not an ar archive")
    with pytest.raises(ImageBuildError, match="not a Debian package"):
        kernel.unpack_deb(tmp_path / "bad.deb", tmp_path / "out")
