"""The Debian root of an image: mmdebstrap's output for one package set and kernel
flavour, with the guest overlay (overlay.py) and Debian's kernel and initramfs built
from it, cached under ``cache_dir/roots/<key>/``.

Apart from image.py because it is the long step (minutes) and shared: templates that
differ only in their files share one root; their files go on top of its tarball, and
the kernel files are linked into each image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from pytest_vmfork.build import aptsources, guestfiles, kernel, modtree, rootfs
from pytest_vmfork.build.imagespec import (
    IMAGE_FILES,
    KERNEL_CONFIG,
    PVH_KERNEL,
    ImageSpec,
    host_wheel_versions,
    remove_tree,
    trusted,
)
from pytest_vmfork.build.overlay import guest_overlay, install_wheels
from pytest_vmfork.errors import ImageBuildError
from pytest_vmfork.host import private


def _kernel_files(kout: Path, root_tar: Path, init_script: bytes, cache_dir: Path, work: Path, out: Path,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """vmlinuz, the PVH vmlinux where it can be extracted, and the initramfs (busybox from
    the root, the kernel's virtio/ext4 modules) into ``out``, and the kernel's module tree
    (once per kernel package: keyed by the .deb's bytes); returns what the manifest records."""
    kpkg, _, kversion = (kout / "info").read_text().strip().partition(" ")
    kdir = work / "kernel-files"
    kernel.unpack_deb(kout / "kernel.deb", kdir)
    (release,) = [p.name for p in (kdir / "lib/modules").iterdir()]
    bzimage = (kdir / f"boot/vmlinuz-{release}").read_bytes()
    (out / IMAGE_FILES["kernel"]).write_bytes(bzimage)
    shutil.copyfile(kdir / f"boot/config-{release}", out / KERNEL_CONFIG)  # what doctor and users read
    pvh = "CONFIG_PVH=y" in (kdir / f"boot/config-{release}").read_text().split()
    if pvh and (vmlinux := kernel.extract_vmlinux(bzimage)):
        (out / PVH_KERNEL).write_bytes(vmlinux)
    moddir = kdir / "lib/modules" / release
    order = kernel.build_initramfs(busybox_from(root_tar, work), init_script, moddir, out / IMAGE_FILES["initrd"])
    with open(kout / "kernel.deb", "rb") as f:
        deb_sha = hashlib.file_digest(f, "sha256").hexdigest()
    tree, built = modtree.ensure(moddir, modtree.key_for(f"deb:{deb_sha}"), cache_dir, progress=progress)
    return {"package": kpkg, "version": kversion, "release": release, "modules": order,
            "modules_key": tree.key, "modules_built": built}


def busybox_from(root_tar: Path, work: Path) -> Path:
    """The root's static busybox, for the initramfs."""
    busybox = work / "busybox"
    with tarfile.open(root_tar) as tar:
        member = next((m for m in tar if m.name in ("./usr/bin/busybox", "./bin/busybox") and m.isfile()), None)
        src = tar.extractfile(member) if member is not None else None
        if src is None:
            raise ImageBuildError(f"{root_tar} has no /usr/bin/busybox; the base packages include busybox-static")
        busybox.write_bytes(src.read())
    return busybox


@dataclass(frozen=True)
class DebianRoot:
    """mmdebstrap's output for one package set, cached under ``cache_dir/roots/<key>/``:
    the root tarball (agent and wheels included), the kernel and initramfs built from
    it, their statistics. Templates that differ only in their files share it: their
    files go on top of the tarball, and the kernel files are linked into each image."""

    key: str
    dir: Path
    used: int  # bytes in 4 KiB blocks
    entries: int
    versions: dict[str, str]
    wheels: dict[str, str]
    kernel: dict[str, Any]
    built: bool = False

    @property
    def tarball(self) -> Path:
        return self.dir / "root.tar"


def _load_root(d: Path) -> DebianRoot | None:
    try:
        meta = json.loads((d / "root.json").read_text())
        if meta["key"] != d.name or (d / "root.tar").stat().st_size != meta["tar_bytes"] \
                or any((d / n).stat().st_size != size for n, size in meta["kernel_files"].items()) \
                or modtree.load(modtree.entry(d.parent.parent, meta["kernel"]["modules_key"])) is None:
            return None  # a root whose module tree is gone is rebuilt: the tree is made from its kernel
        return DebianRoot(d.name, d, int(meta["used"]), int(meta["entries"]), dict(meta["versions"]),
                          dict(meta["wheels"]), dict(meta["kernel"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def debian_root(base: ImageSpec, cache_dir: Path, *, mode: rootfs.BuildMode, apt: aptsources.AptConfig,
                progress: Callable[[str], None]) -> DebianRoot:
    """The Debian root for ``base`` (packages and kernel flavour, no files): cached, or
    built now by mmdebstrap, once per key however many processes ask."""
    key = base.key()
    roots = Path(cache_dir) / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    final = roots / key
    if trusted(final, progress) and (found := _load_root(final)):
        return found
    with filelock.FileLock(str(roots / f"{key}.lock")):
        if trusted(final) and (found := _load_root(final)):
            return found
        for stale in [*roots.glob(f".staging-{key}-*"), *roots.glob(f".old-{key}-*")]:
            remove_tree(stale)  # left by a crashed build; we hold the key's lock
        if final.exists():  # incomplete, or from an older recipe: set aside, never reused
            old = roots / f".old-{key}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
            remove_tree(old)
        staging = roots / f".staging-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        work = staging / "work"
        work.mkdir(parents=True)
        try:
            progress(f"vmfork: building guest image root {key[:12]} (Debian {aptsources.GUEST_SUITE} by "
                     f"mmdebstrap, {mode.name} mode; packages: {', '.join(base.packages) or 'base only'})")
            guest = guestfiles.guest_files()
            wheels = host_wheel_versions()
            site = work / "site"
            install_wheels(wheels, Path(cache_dir) / "wheels", site)
            overlay = work / "overlay.tar"
            rootfs.write_overlay(guest_overlay(site), overlay)
            hook = work / "fetch-kernel.sh"
            hook.write_bytes(guest["fetch-kernel.sh"])
            tar_path, kout = rootfs.build_tarball(packages=base.packages, mode=mode, apt=apt, overlay=overlay,
                                                  kernel_hook=hook, kernel_flavour=base.kernel_flavour, work=work)
            os.rename(tar_path, staging / "root.tar")
            used, entries, versions = rootfs.tar_stats(staging / "root.tar")
            kinfo = _kernel_files(kout, staging / "root.tar", guest["initramfs-init.sh"], Path(cache_dir), work,
                                  staging, progress)
            remove_tree(work)
            (staging / "root.json").write_text(json.dumps({
                "key": key, "tar_bytes": (staging / "root.tar").stat().st_size, "used": used,
                "entries": entries, "versions": versions, "wheels": wheels, "spec": base.describe(),
                "kernel": kinfo, "kernel_files": {n: (staging / n).stat().st_size for n in
                                                  (*IMAGE_FILES.values(), PVH_KERNEL, KERNEL_CONFIG)
                                                  if (staging / n).exists()},
                "build_mode": mode.name, "apt_origin": apt.origin}, indent=2, sort_keys=True))
            private.seal(staging)
            os.rename(staging, final)
        finally:
            remove_tree(staging)
    root = _load_root(final)
    if root is None:
        raise ImageBuildError(f"Debian root {final} is incomplete right after its build; delete it and retry")
    return dataclasses.replace(root, built=True)

