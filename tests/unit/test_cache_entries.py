"""Unit tests for cache entries that move: relative manifest paths and the compatibility check."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from pytest_vmfork.errors import BuildError
from pytest_vmfork.vm import snapshot as snap_mod
from pytest_vmfork.vm.snapshot import Snapshot, incompatibility
from pytest_vmfork.vm.vmm import cpu_fingerprint, machine_type, qemu_version

IMAGE_KEY = "ab" * 32


def make_cache(root: Path) -> Path:
    """A cache with one image and one snapshot entry, as the builders lay them out."""
    image = root / "images" / IMAGE_KEY
    image.mkdir(parents=True)
    for name in ("vmlinux", "initrd.img", "rootfs.img"):
        (image / name).write_bytes(name.encode())
    entry = root / "snapshots" / "k1"
    entry.mkdir(parents=True)
    (entry / "state.bin").write_bytes(b"state")
    (entry / "memory.ram").write_bytes(bytes(4096))
    manifest = {
        "key": "k1", "nonce": "00" * 16, "offsets": {}, "mailboxes": [], "qemu": qemu_version(),
        "machine_type": machine_type(), "cpu": cpu_fingerprint("tcg"),
        "machine": {"kernel": f"../../images/{IMAGE_KEY}/vmlinux", "initrd": f"../../images/{IMAGE_KEY}/initrd.img",
                    "rootfs": f"../../images/{IMAGE_KEY}/rootfs.img", "cmdline": "console=ttyS0",
                    "memory_mib": 256, "vcpus": 1, "accel": "tcg"},
        "files": {"state.bin": {"size": 5, "sha256": hashlib.sha256(b"state").hexdigest()},
                  "memory.ram": {"size": 4096}},
    }
    (entry / "manifest.json").write_text(json.dumps(manifest))
    return entry


def test_a_copied_cache_resolves_every_path_inside_the_copy(tmp_path: Path) -> None:
    make_cache(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere/b")
    shutil.rmtree(tmp_path / "a")
    snap = Snapshot.load(tmp_path / "elsewhere/b/snapshots/k1")
    image = tmp_path / "elsewhere/b/images" / IMAGE_KEY
    assert snap.machine.kernel == image / "vmlinux" and snap.machine.kernel.read_bytes() == b"vmlinux"
    assert snap.machine.rootfs == image / "rootfs.img" and snap.memory_path.parent == snap.dir


def test_an_absolute_path_in_a_manifest_is_damage_not_a_crash(tmp_path: Path) -> None:
    entry = make_cache(tmp_path)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["machine"]["kernel"] = "/root/.cache/pytest-vmfork/images/x/vmlinux"
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BuildError, match="kernel path /root/.cache.* is absolute"):
        Snapshot.load(entry)


def test_a_missing_image_file_is_named(tmp_path: Path) -> None:
    entry = make_cache(tmp_path)
    (tmp_path / "images" / IMAGE_KEY / "initrd.img").unlink()
    with pytest.raises(BuildError, match="initrd.img is missing"):
        Snapshot.load(entry)


def test_same_qemu_and_machine_type_is_compatible(tmp_path: Path) -> None:
    manifest = json.loads((make_cache(tmp_path) / "manifest.json").read_text())
    assert incompatibility(manifest, "tcg") == ""


@pytest.mark.parametrize("field,value", [
    ("qemu", "QEMU emulator version 6.2.0"), ("machine_type", "pc-q35-6.2"), ("cpu", "kvm:Other CPU:123"),
])
def test_another_qemu_machine_type_or_cpu_gives_a_one_line_reason(tmp_path: Path, field: str, value: str) -> None:
    manifest = json.loads((make_cache(tmp_path) / "manifest.json").read_text())
    manifest[field] = value
    why = incompatibility(manifest, "tcg")
    assert why.startswith(f"made with {field} {value}, this host has ") and "\n" not in why


def test_an_entry_from_before_the_check_is_incompatible_not_an_error(tmp_path: Path) -> None:
    manifest = json.loads((make_cache(tmp_path) / "manifest.json").read_text())
    del manifest["machine_type"]
    assert "machine_type (not recorded)" in incompatibility(manifest, "tcg")


def test_entry_path_normalises_relative_paths(tmp_path: Path) -> None:
    assert snap_mod.entry_path(tmp_path / "snapshots/k", "../../images/x/vmlinux") == tmp_path / "images/x/vmlinux"
