"""Unit tests for the pure parts of pytest_vmfork.image (no network, no apt, no QEMU)."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from pytest_vmfork import image
from pytest_vmfork.image import (
    ImageBuildError,
    ImageSpec,
    compute_key,
    extract_vmlinux,
    module_load_order,
    newc_archive,
    package_closure,
    parse_apt_depends,
    parse_modules_dep,
    should_prune,
)

WHEELS = {"grpcio": "1.0", "protobuf": "2.0", "pyroute2": "0.1", "typing_extensions": "4.0"}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A fake project tree with the files that shape the image."""
    (tmp_path / "guest").mkdir()
    (tmp_path / "guest/rc.sh").write_text("#!/bin/sh\necho rc\n")
    (tmp_path / "guest/inittab").write_text("::sysinit:/etc/vmfork/rc.sh\n")
    (tmp_path / "guest/agent.py").write_text("print('agent')\n")
    (tmp_path / "pytest_vmfork/proto").mkdir(parents=True)
    (tmp_path / "pytest_vmfork/mailbox.py").write_text("MAILBOX = 1\n")
    (tmp_path / "pytest_vmfork/proto/agent_pb2.py").write_text("X = 1\n")
    (tmp_path / "pytest_vmfork/plugin.py").write_text("PLUGIN = 1\n")
    return tmp_path


def key(src: Path, spec: ImageSpec | None = None, wheels: dict[str, str] = WHEELS) -> str:
    return compute_key(spec or ImageSpec(), src, wheels)


# --- key ---------------------------------------------------------------------------------

def test_key_is_stable_hex(src: Path) -> None:
    assert key(src) == key(src)
    assert len(key(src)) == 64 and int(key(src), 16) >= 0


@pytest.mark.parametrize("path", ["guest/rc.sh", "guest/agent.py", "pytest_vmfork/mailbox.py",
                                  "pytest_vmfork/proto/agent_pb2.py"])
def test_key_changes_when_a_guest_source_changes(src: Path, path: str) -> None:
    before = key(src)
    (src / path).write_text((src / path).read_text() + "# changed\n")
    assert key(src) != before


def test_key_changes_when_a_guest_file_is_added(src: Path) -> None:
    before = key(src)
    (src / "guest/extra.conf").write_text("x\n")
    assert key(src) != before
    (src / "guest/extra.conf").unlink()
    (src / "pytest_vmfork/proto/more_pb2.py").write_text("Y = 2\n")
    assert key(src) != before


def test_key_ignores_host_only_modules_and_bytecode(src: Path) -> None:
    before = key(src)
    (src / "pytest_vmfork/plugin.py").write_text("PLUGIN = 2\n")
    (src / "guest/__pycache__").mkdir()
    (src / "guest/__pycache__/agent.cpython-311.pyc").write_bytes(b"\0" * 16)
    (src / "pytest_vmfork/proto/notes.txt").write_text("not python\n")
    assert key(src) == before


def test_key_depends_on_package_set_not_order(src: Path) -> None:
    base = key(src)
    ab = key(src, ImageSpec(packages=("strace", "iproute2")))
    assert ab != base
    assert key(src, ImageSpec(packages=("iproute2", "strace"))) == ab
    assert key(src, ImageSpec(packages=("iproute2", "strace", "iproute2"))) == ab
    assert key(src, ImageSpec(packages=("iproute2",))) != ab


def test_key_depends_on_files_content_and_path(src: Path) -> None:
    one = key(src, ImageSpec(files=(("/etc/a", b"1"),)))
    assert one != key(src)
    assert key(src, ImageSpec(files=(("/etc/a", b"2"),))) != one
    assert key(src, ImageSpec(files=(("/etc/b", b"1"),))) != one
    two = key(src, ImageSpec(files=(("/etc/a", b"1"), ("/etc/b", b"2"))))
    assert key(src, ImageSpec(files=(("/etc/b", b"2"), ("/etc/a", b"1")))) == two


def test_key_depends_on_flavour_wheels_and_recipe(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = key(src)
    assert key(src, ImageSpec(kernel_flavour="cloud-amd64")) != base
    assert key(src, wheels={**WHEELS, "grpcio": "1.1"}) != base
    monkeypatch.setattr(image, "RECIPE_VERSION", image.RECIPE_VERSION + 1)
    assert key(src) != base


def test_key_without_optional_sources(tmp_path: Path) -> None:
    (tmp_path / "guest").mkdir()
    assert len(key(tmp_path)) == 64


def test_spec_key_uses_the_real_sources() -> None:
    pytest.importorskip("grpc")
    assert ImageSpec().key() == ImageSpec().key() != ImageSpec(packages=("strace",)).key()


@pytest.mark.parametrize("files", [
    (("etc/relative", b""),), (("/", b""),), (("/etc/../x", b""),), (("/etc//x", b""),),
    (("/etc/x/", b""),), (("/a", b"1"), ("/a", b"2")),
])
def test_spec_rejects_bad_files(files: tuple) -> None:
    with pytest.raises(ValueError):
        ImageSpec(files=files)


def test_spec_rejects_bad_names() -> None:
    with pytest.raises(ValueError):
        ImageSpec(packages=("Bad Name",))
    with pytest.raises(ValueError):
        ImageSpec(kernel_flavour="../amd64")


def test_spec_accepts_lists_and_stays_hashable() -> None:
    spec = ImageSpec(packages=["strace"], files=[("/etc/x", b"1")])  # type: ignore[arg-type]
    assert spec.packages == ("strace",) and spec.files == (("/etc/x", b"1"),)
    assert hash(spec) == hash(ImageSpec(packages=("strace",), files=(("/etc/x", b"1"),)))


# --- apt dependency closure ------------------------------------------------------------

APT_DEPENDS = """\
python3
  PreDepends: python3-minimal
  Depends: python3.11
busybox-static
python3-minimal
  Depends: dpkg
python3.11
 |Depends: media-types
  Depends: mime-support
  Depends: libc6
iproute2
 |Depends: debconf
  Depends: <debconf-2.0>
    cdebconf
    debconf
  Depends: <awk>
    mawk
    gawk
dpkg
  Depends: tar
  Depends: libc6
media-types
mime-support
  Depends: mailcap
mailcap
  Depends: perl
perl
  Depends: perl-base
perl-base
libc6
  Depends: libgcc-s1
libgcc-s1
tar
debconf
cdebconf
mawk
  Depends: libc6
gawk
<debconf-2.0>
<awk>
"""


def test_parse_apt_depends_groups_alternatives_and_providers() -> None:
    graph = parse_apt_depends(APT_DEPENDS)
    assert graph["python3"] == [["python3-minimal"], ["python3.11"]]
    assert graph["python3.11"] == [["media-types", "mime-support"], ["libc6"]]
    assert graph["iproute2"] == [["debconf", "cdebconf", "debconf"], ["mawk", "gawk"]]
    assert graph["busybox-static"] == [] and graph["<awk>"] == []


def test_closure_drops_excluded_and_takes_first_alternative() -> None:
    graph = parse_apt_depends(APT_DEPENDS)
    closure = package_closure(graph, ["python3", "busybox-static"])
    assert closure == ["busybox-static", "libc6", "libgcc-s1", "media-types", "python3",
                       "python3-minimal", "python3.11"]


def test_closure_resolves_virtual_dependencies_to_a_provider() -> None:
    closure = package_closure(parse_apt_depends(APT_DEPENDS), ["iproute2"])
    assert "mawk" in closure and "gawk" not in closure
    assert not {"debconf", "cdebconf"} & set(closure)  # both providers are excluded


def test_closure_keeps_requested_packages_even_if_excluded() -> None:
    closure = package_closure(parse_apt_depends(APT_DEPENDS), ["python3", "perl", "dpkg"])
    assert "perl" in closure and "dpkg" in closure and "libc6" in closure
    assert "perl-base" not in closure and "tar" not in closure  # excluded dependencies must be requested too


def test_closure_prefers_an_already_chosen_alternative() -> None:
    graph = parse_apt_depends(APT_DEPENDS)
    closure = package_closure(graph, ["python3", "mime-support"], excluded=set())
    assert "mime-support" in closure and "media-types" not in closure
    assert "perl-base" in closure  # nothing excluded: mime-support's whole chain comes along


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
"""


def test_parse_modules_dep_normalizes_names() -> None:
    deps = parse_modules_dep(MODULES_DEP)
    assert deps["virtio_rng"][0] == "kernel/drivers/char/hw_random/virtio-rng.ko"
    assert deps["ext4"][1] == ["kernel/fs/jbd2/jbd2.ko", "kernel/fs/mbcache.ko", "kernel/lib/crc16.ko"]


def test_module_order_puts_dependencies_first_once() -> None:
    order = module_load_order(MODULES_DEP, image.KERNEL_MODULES)
    assert len(order) == len(set(order)) == 17
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
    dep = image.modules_dep_from_modinfo(tmp_path)
    assert module_load_order(dep, ["a"]) == ["kernel/fs/b.ko", "kernel/c-d.ko", "kernel/fs/a.ko"]


# --- pruning -------------------------------------------------------------------------

@pytest.mark.parametrize("rel", [
    "usr/share/doc", "usr/share/doc/libc6/copyright", "usr/share/man/man1/python3.1.gz",
    "usr/share/info/dir", "usr/share/locale/de/LC_MESSAGES/x.mo", "usr/share/lintian/overrides/x",
    "usr/lib/python3.11/test", "usr/lib/python3.11/test/test_os.py", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/tkinter/__init__.py", "usr/lib/python3.11/ensurepip",
    "usr/lib/python3.11/lib2to3/tests/data/x.py", "usr/lib/python3.11/unittest/test/test_case.py",
    "usr/lib/python3.11/ctypes/test", "usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
    "opt/vmfork/site/grpc/__pycache__",
])
def test_prune(rel: str) -> None:
    assert should_prune(rel)


@pytest.mark.parametrize("rel", [
    "usr/share", "usr/share/docs-not", "usr/share/zoneinfo/UTC", "usr/lib/locale/C.utf8/LC_CTYPE",
    "usr/lib/python3.11", "usr/lib/python3.11/os.py", "usr/lib/python3.11/unittest/case.py",
    "usr/lib/python3.11/lib2to3/fixer_base.py", "usr/lib/python3.11/testing.py",
    "usr/lib/python3.11/contest", "opt/vmfork/site/pyroute2/test", "usr/bin/python3.11",
    "etc/mime.types",
])
def test_keep(rel: str) -> None:
    assert not should_prune(rel)


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


# --- cache completeness ----------------------------------------------------------------

def test_load_requires_manifest_and_sizes(tmp_path: Path) -> None:
    import json
    d = tmp_path / ("a" * 64)
    d.mkdir()
    assert image._load(d) is None
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (d / name).write_bytes(b"x" * 3)
    manifest = {"key": d.name, "files": {"vmlinuz": 3, "initrd.img": 3, "rootfs.img": 3}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    img = image._load(d)
    assert img is not None and img.kernel == d / "vmlinuz" and img.rootfs == d / "rootfs.img"
    (d / "vmlinux").write_bytes(b"elf")
    (d / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "vmlinux": 3}}))
    assert image._load(d).kernel == d / "vmlinux"
    (d / "rootfs.img").write_bytes(b"x")  # truncated
    assert image._load(d) is None
    (d / "rootfs.img").write_bytes(b"xxx")
    (d / "manifest.json").write_text(json.dumps({"key": d.name, "files": {}}))
    assert image._load(d) is None  # lists none of the image files
    (d / "manifest.json").write_text("{not json")
    assert image._load(d) is None
