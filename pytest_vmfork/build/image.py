"""Build and cache the guest image: a Debian kernel, a tiny initramfs and a read-only ext4 root.

The root is a real Debian bookworm system built by mmdebstrap (pytest_vmfork.build.rootfs),
with the template's packages installed by dpkg, plus the host venv's exact
protobuf/pyroute2 wheels (one generated protobuf module works on both sides) and
the agent, found through the installed package (pytest_vmfork.build.guestfiles). Everything
is cached under ``cache_dir/images/<key>/`` with a manifest whose paths are relative
to that directory, so a cache copied elsewhere still hits. The key covers exactly what
shapes the image (see :func:`compute_key`), so ``apt-get update`` alone never forces a
rebuild. The kernel's module tree is not in the image: it is built once per kernel
(pytest_vmfork.build.modtree, ``cache_dir/modules/<key>/``), shared by every image of that
kernel, and named in the manifest by key. A user's kernel (``ImageSpec.kernel``) goes on
the same cached Debian root: its image differs in the kernel, initramfs and module tree.

This module holds the build of one image (locked, staged, published); the spec, key and
cache entry are imagespec.py, the shared Debian root debianroot.py, the guest's file
layout overlay.py. Their public names are re-exported here, the one import path callers use.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock

from pytest_vmfork.build import aptsources, guestfiles, kernel, modtree, rootfs
from pytest_vmfork.build.debianroot import DebianRoot, busybox_from, debian_root
from pytest_vmfork.build.imagespec import (
    GUEST_DISTRIBUTIONS,
    IMAGE_FILES,
    KERNEL_CMDLINE,
    KERNEL_CONFIG,
    MANIFEST,
    PVH_KERNEL,
    RECIPE_VERSION,
    BuildOptions,
    Image,
    ImageSpec,
    cached_image,
    compute_key,
    host_wheel_versions,
    load_cached,
    remove_tree,
    trusted,
)
from pytest_vmfork.build.overlay import guest_overlay
from pytest_vmfork.errors import ConfigError, ImageBuildError
from pytest_vmfork.host import private

__all__ = [
    "GUEST_DISTRIBUTIONS", "IMAGE_FILES", "KERNEL_CMDLINE", "KERNEL_CONFIG", "MANIFEST", "PVH_KERNEL",
    "RECIPE_VERSION", "BuildOptions", "DebianRoot", "Image", "ImageSpec", "build_image", "cached_image",
    "compute_key", "debian_root", "guest_overlay", "host_wheel_versions", "load_cached", "trusted",
]

_MiB = 1 << 20


def build_image(spec: ImageSpec, cache_dir: Path, *, progress: Callable[[str], None] = lambda s: None,
                force: bool = False, options: BuildOptions = BuildOptions()) -> Image:
    """Return the image for ``spec``, building it unless a complete one is cached.

    Concurrent callers (xdist workers, parallel runs) build it once: the build holds a
    per-key file lock, happens in a staging dir and is published with an atomic rename.
    """
    key = spec.key()
    images = Path(cache_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / key
    if not force and trusted(final, progress) and (image := load_cached(final)):
        return image
    lock = filelock.FileLock(str(images / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        progress(f"vmfork: waiting for another process building image {key[:12]}")
        lock.acquire()
    try:
        if not force and trusted(final) and (image := load_cached(final)):
            progress(f"vmfork: image {key[:12]} built by another process")
            return image
        for stale in [*images.glob(f".staging-{key}-*"), *images.glob(f".old-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by crashed builds; we hold the key's lock
        staging = images / f".staging-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _build(spec, key, Path(cache_dir), staging, progress, options)
            private.seal(staging)
            if final.exists():  # forced, untrusted or incomplete: set aside; running VMs keep their open files
                old = images / f".old-{key}-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging, final)
        finally:
            remove_tree(staging)
    finally:
        lock.release()
    image = load_cached(final)
    if image is None:
        raise ImageBuildError(f"image {final} is incomplete right after its build; delete it and retry")
    return image



def _build(spec: ImageSpec, key: str, cache_dir: Path, out: Path, progress: Callable[[str], None],
           options: BuildOptions) -> None:
    start = time.monotonic()
    is_root = os.geteuid() == 0
    # Everything that can be checked is checked before the long steps start.
    mode = rootfs.choose_mode(options.mode)
    if problems := rootfs.extract_problems(is_root):
        raise ImageBuildError("cannot write the guest root filesystem: " + "; ".join(problems))
    apt = aptsources.resolve(options.apt_sources)
    guestfiles.guest_files()  # an install without the guest files fails here, before the long steps
    user_kernel = _check_user_kernel(spec)  # a kernel that cannot run a fork: ConfigError, nothing built
    work = out / "work"
    work.mkdir(parents=True)

    stages: dict[str, float] = {}
    mark = time.monotonic()

    def stage(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        stages[name] = round(now - mark, 1)
        mark = now

    root = debian_root(ImageSpec(kernel_flavour=spec.kernel_flavour, packages=spec.packages), cache_dir,
                       mode=mode, apt=apt, progress=progress)
    stage("debian_root" if root.built else "debian_root_cached")

    files = work / "files.tar"
    rootfs.write_overlay({p: (c, 0o755 if c.startswith(b"#!") else 0o644) for p, c in spec.files}, files)
    used = root.used + sum(-(-len(c) // 4096) * 4096 for _, c in spec.files)
    progress(f"vmfork: writing ext4 root of image {key[:12]} ({used // _MiB} MiB of files, "
             f"{len(root.versions)} packages)")
    size = -(-(used + max(used // 5, 64 * _MiB)) // _MiB) * _MiB
    uuid = f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:32]}"
    tree = work / "root"
    rootfs.tarball_to_ext4([root.tarball, files], tree, out / IMAGE_FILES["rootfs"], size=size,
                           inodes=(root.entries + len(spec.files)) * 5 // 4 + 1024, uuid=uuid)
    stage("ext4")

    if user_kernel is None:
        for name in (*IMAGE_FILES.values(), PVH_KERNEL, KERNEL_CONFIG):
            if name != IMAGE_FILES["rootfs"] and (root.dir / name).exists():
                _link_or_copy(root.dir / name, out / name)  # the same for every image of this root
        kinfo = root.kernel
    else:
        kinfo = _user_kernel_files(*user_kernel, root, cache_dir, work, out, progress)
    stage("kernel_and_initramfs")

    manifest: dict[str, Any] = {
        "key": key, "recipe_version": RECIPE_VERSION, "spec": spec.describe(), "root_key": root.key,
        "suite": aptsources.GUEST_SUITE, "build_mode": mode.name, "apt_origin": apt.origin,
        "kernel": kinfo, "modules_key": kinfo.get("modules_key"), "debs": root.versions, "wheels": root.wheels,
        "files": {n: (out / n).stat().st_size for n in [*IMAGE_FILES.values(), PVH_KERNEL] if (out / n).exists()},
        "root_content_bytes": used, "stage_seconds": stages,
        "build_seconds": round(time.monotonic() - start, 1),
    }
    remove_tree(work)
    for name in manifest["files"]:  # shared by every VM: guard against accidental writes
        (out / name).chmod(0o444)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    progress(f"vmfork: image {key[:12]} built in {manifest['build_seconds']} s, {mode.name} mode ("
             + ", ".join(f"{k} {v} s" for k, v in stages.items()) + ")")



def _check_user_kernel(spec: ImageSpec) -> tuple[kernel.UserKernel, Path | None] | None:
    """A user's kernel and module tree, checked against what a fork needs (its config,
    read without booting it): ConfigError naming the first missing option. None: Debian's."""
    if spec.kernel is None:
        return None
    uk = kernel.inspect_kernel(Path(spec.kernel))
    moddir = kernel.find_module_tree(Path(spec.kernel_modules)) if spec.kernel_modules else None
    if problems := uk.problems(with_modules=moddir is not None):
        raise ConfigError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if moddir is not None and moddir.name != uk.release:
        raise ConfigError(f"Template kernel_modules={spec.kernel_modules!r} holds modules of kernel {moddir.name}, "
                          f"kernel={spec.kernel!r} is {uk.release}; pass the tree of the same build")
    return uk, moddir


def _user_kernel_files(uk: kernel.UserKernel, moddir: Path | None, root: DebianRoot, cache_dir: Path, work: Path,
                       out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """A user's (checked) kernel into ``out``, an initramfs for it, and its module tree
    (if given) built once per content."""
    data = uk.path.read_bytes()
    (out / IMAGE_FILES["kernel"]).write_bytes(data)
    if uk.kind == "elf":
        (out / PVH_KERNEL).write_bytes(data)
    elif uk.config and uk.config.get("CONFIG_PVH") == "y" and (vmlinux := kernel.extract_vmlinux(data)):
        (out / PVH_KERNEL).write_bytes(vmlinux)
    init = guestfiles.guest_files()["initramfs-init.sh"]
    order = kernel.build_initramfs(busybox_from(root.tarball, work), init, moddir, out / IMAGE_FILES["initrd"],
                                   strict=False)
    info: dict[str, Any] = {"user_kernel": str(uk.path), "release": uk.release, "config": uk.config_source,
                            "modules": order}
    if moddir is not None:
        tree, built = modtree.ensure(moddir, modtree.key_for(f"tree:{modtree.tree_digest(moddir)}"), cache_dir,
                                     progress=progress)
        info.update(modules_key=tree.key, modules_built=built)
    return info


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)
