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
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filelock

from pytest_vmfork.build import aptsources

from pytest_vmfork.build import guestfiles

from pytest_vmfork.build import kernel

from pytest_vmfork.build import modtree

from pytest_vmfork.host import private

from pytest_vmfork.build import rootfs
from pytest_vmfork.errors import ConfigError, ImageBuildError

#: Bump whenever this module changes what it puts into an image (the module's own
#: bytes are deliberately not hashed, so comment edits do not force rebuilds).
RECIPE_VERSION = 5  # 5: the kernel's module tree (modtree) attached to every image

#: Guest Python distributions, pinned to the host venv's versions (no grpcio: the
#: agent's channel is plain framed protobuf, docs/protocol.md).
GUEST_DISTRIBUTIONS = ("protobuf", "pyroute2")

IMAGE_FILES = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.img"}
PVH_KERNEL = "vmlinux"  # uncompressed ELF kernel, built when it can be extracted (see kernel.extract_vmlinux)
KERNEL_CONFIG = "config"  # the kernel's .config (Debian's config-<release>), beside vmlinuz
MANIFEST = "manifest.json"
_MiB = 1 << 20

# Re-exported for callers that think of the command line as part of the image.
KERNEL_CMDLINE = kernel.KERNEL_CMDLINE


@dataclass(frozen=True)
class ImageSpec:
    """What to put into a guest image; two equal specs always share one cached image."""

    kernel_flavour: str = "amd64"  # Debian flavour: "amd64" has VMGenID, "cloud-amd64" boots leaner
    packages: tuple[str, ...] = ()  # extra Debian packages, installed with their dependencies
    files: tuple[tuple[str, bytes], ...] = ()  # (absolute guest path, content); 0755 if it starts with b"#!"
    kernel: str | None = None  # a user's kernel file (bzImage or ELF vmlinux) instead of Debian's
    kernel_modules: str | None = None  # its lib/modules/<release> tree (or INSTALL_MOD_PATH); needs kernel

    def __post_init__(self) -> None:
        # Accept lists for convenience but store tuples so the spec stays hashable.
        object.__setattr__(self, "packages", tuple(self.packages))
        object.__setattr__(self, "files", tuple((str(p), bytes(c)) for p, c in self.files))
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", self.kernel_flavour):
            raise ValueError(f"bad kernel_flavour {self.kernel_flavour!r}; use e.g. 'amd64' or 'cloud-amd64'")
        for name in self.packages:
            if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", name):
                raise ValueError(f"bad Debian package name {name!r} in ImageSpec.packages")
        paths = [path for path, _ in self.files]
        for path in paths:
            parts = path.split("/")
            if not path.startswith("/") or path == "/" or "" in parts[1:] or "." in parts or ".." in parts:
                raise ValueError(f"ImageSpec.files path {path!r} must be a normalized absolute file path")
        if len(set(paths)) != len(paths):
            raise ValueError("ImageSpec.files has the same path twice")
        if self.kernel_modules is not None and self.kernel is None:
            raise ValueError("kernel_modules= needs kernel=: the module tree of Debian's kernel is always attached")

    def key(self) -> str:
        """Cache key: sha256 of everything that shapes the image, from the installed package and venv."""
        return compute_key(self, guestfiles.key_sources(), host_wheel_versions())

    def describe(self) -> dict[str, Any]:
        """JSON-able form of the spec for manifest.json (file contents as hashes; a user's
        kernel and module tree by content, so a rebuilt kernel changes the key)."""
        doc: dict[str, Any] = {
            "kernel_flavour": self.kernel_flavour,
            "packages": sorted(set(self.packages)),
            "files": {p: {"sha256": hashlib.sha256(c).hexdigest(), "size": len(c)} for p, c in sorted(self.files)},
        }
        if self.kernel is not None:
            with open(self.kernel, "rb") as f:
                doc["kernel"] = {"sha256": hashlib.file_digest(f, "sha256").hexdigest()}
            if self.kernel_modules is not None:
                doc["kernel_modules"] = {"digest": modtree.tree_digest(
                    kernel.find_module_tree(Path(self.kernel_modules)))}
        return doc


@dataclass(frozen=True)
class BuildOptions:
    """How to build an image (not what goes into it, so never part of the key)."""

    apt_sources: str | None = None  # vmfork_apt_sources; None: the host's apt configuration
    mode: str = "auto"  # mmdebstrap mode: auto, root, unshare or fakechroot


@dataclass(frozen=True)
class Image:
    """A complete built image in the cache; its files are never modified after the build.

    ``kernel`` is what to pass to QEMU's ``-kernel``: the uncompressed ELF ``vmlinux``,
    which QEMU boots through the kernel's PVH entry point (skipping the kernel's own
    decompression: ~3 s under TCG for the XZ-compressed amd64 kernel), or the Debian
    ``vmlinuz`` bzImage when no ELF could be extracted. ``vmlinuz`` is always in ``dir``.
    """

    key: str
    dir: Path
    kernel: Path
    initrd: Path
    rootfs: Path
    manifest: dict[str, Any] = field(repr=False)
    modules: modtree.ModuleTree | None = None  # the kernel's module tree (None: a user kernel without one)


def compute_key(spec: ImageSpec, sources: Mapping[str, bytes], wheel_versions: Mapping[str, str]) -> str:
    """The cache key for ``spec`` given the packaged guest sources and guest wheel versions.

    Resolved Debian package versions are deliberately left out: the image records them
    in its manifest, but a mirror update should not force every user to rebuild. So are
    the apt sources and the build mode: they change where files come from, not which.
    """
    doc = {
        "recipe": RECIPE_VERSION,
        "suite": aptsources.GUEST_SUITE,
        "base": list(rootfs.BASE_PACKAGES),
        **spec.describe(),
        "sources": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(sources.items())},
        "wheels": dict(sorted(wheel_versions.items())),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def host_wheel_versions() -> dict[str, str]:
    """Versions of GUEST_DISTRIBUTIONS in the host venv (the guest must run the same ones)."""
    try:
        return {d: importlib.metadata.version(d) for d in GUEST_DISTRIBUTIONS}
    except importlib.metadata.PackageNotFoundError as e:
        raise ImageBuildError(f"{e.name} is not installed in the host venv ({sys.executable}); the guest "
                              f"gets the same version: pip install {' '.join(GUEST_DISTRIBUTIONS)}") from e


# --- the cache ---------------------------------------------------------------------------

def trusted(d: Path, progress: Callable[[str], None] = lambda s: None) -> bool:
    """Whether cache entry ``d`` exists and nobody else could have written it; an
    untrusted one is reported and then rebuilt (set aside, never used)."""
    if not d.exists():
        return False
    try:
        private.verify_cache_entry(d)
    except private.PrivateDirError as exc:
        progress(f"vmfork: {exc}; rebuilding it")
        return False
    return True


def load_cached(d: Path) -> Image | None:
    """The complete image in cache entry ``d``, or None (missing, partial or foreign).

    Callers that restore from it check :func:`trusted` first."""
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["key"] != d.name or not set(IMAGE_FILES.values()) <= set(files) \
                or any("/" in n or (d / n).stat().st_size != s for n, s in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    paths = {k: d / v for k, v in IMAGE_FILES.items()}
    if PVH_KERNEL in manifest["files"]:
        paths["kernel"] = d / PVH_KERNEL
    tree = None
    if manifest.get("modules_key"):  # found by key beside images/: a moved cache still resolves
        tree = modtree.load(modtree.entry(d.parent.parent, manifest["modules_key"]))
        if tree is None:
            return None
    return Image(key=d.name, dir=d, manifest=manifest, modules=tree, **paths)


def cached_image(spec: ImageSpec, cache_dir: Path) -> Image | None:
    """The complete cached image for ``spec``, or None; never builds."""
    return load_cached(Path(cache_dir) / "images" / spec.key())


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
            _rmtree(staging)
    finally:
        lock.release()
    image = load_cached(final)
    if image is None:
        raise ImageBuildError(f"image {final} is incomplete right after its build; delete it and retry")
    return image


def _rmtree(path: Path) -> None:
    """Remove a build tree; a non-root build's unpacked root may hold read-only directories."""
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)


# --- build -------------------------------------------------------------------------------

def _run(cmd: Sequence[object], what: str, fix: str, **kw: Any) -> str:
    """Run ``cmd``; on failure raise ImageBuildError naming ``what`` failed and the ``fix``."""
    try:
        return str(subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                                  errors="replace", **kw).stdout)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what} failed: {cmd[0]} is not installed; {fix}") from e
    except subprocess.CalledProcessError as e:
        tail = " | ".join((e.stderr or e.stdout or "").strip().splitlines()[-6:]) or "(no output)"
        raise ImageBuildError(f"{what} failed (exit {e.returncode}): {tail}; {fix}") from e


def guest_overlay(site: Path) -> dict[str, tuple[bytes | str, int]]:
    """The files pytest-vmfork adds to the Debian root: path -> (content or symlink target, mode).

    A template's own files are not among them: they go on top of the cached root per image."""
    guest = guestfiles.guest_files()
    shared = guestfiles.shared_modules()
    files: dict[str, tuple[bytes | str, int]] = {
        "/etc/inittab": (guest["inittab"], 0o644),
        "/etc/vmfork/rc.sh": (guest["rc.sh"], 0o755),
        "/etc/hostname": (b"vmfork\n", 0o644),
        "/etc/hosts": (b"127.0.0.1\tlocalhost\n127.0.1.1\tvmfork\n::1\tlocalhost ip6-localhost ip6-loopback\n",
                       0o644),
        "/usr/sbin/init": ("/bin/busybox", 0),  # busybox init runs guest/inittab
        "/usr/local/bin/vmfork-ack": (guest["vmfork-ack"], 0o755),
        "/opt/vmfork/agent.py": (guest["agent.py"], 0o644),
        "/opt/vmfork/pytest_vmfork/__init__.py": (b"", 0o644),  # not the host's: that one imports the plugin
        "/opt/vmfork/pytest_vmfork/proto/__init__.py": (b"", 0o644),
    }
    for rel, data in shared.items():
        files[f"/opt/vmfork/pytest_vmfork/{rel}"] = (data, 0o644)
    for path in sorted(site.rglob("*")):
        rel = "/opt/vmfork/site/" + path.relative_to(site).as_posix()
        if path.is_symlink():
            files[rel] = (os.readlink(path), 0)
        elif path.is_file() and "__pycache__" not in path.parts:
            files[rel] = (path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
    return files


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
    _rmtree(work)
    for name in manifest["files"]:  # shared by every VM: guard against accidental writes
        (out / name).chmod(0o444)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    progress(f"vmfork: image {key[:12]} built in {manifest['build_seconds']} s, {mode.name} mode ("
             + ", ".join(f"{k} {v} s" for k, v in stages.items()) + ")")


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
    order = kernel.build_initramfs(_busybox(root_tar, work), init_script, moddir, out / IMAGE_FILES["initrd"])
    with open(kout / "kernel.deb", "rb") as f:
        deb_sha = hashlib.file_digest(f, "sha256").hexdigest()
    tree, built = modtree.ensure(moddir, modtree.key_for(f"deb:{deb_sha}"), cache_dir, progress=progress)
    return {"package": kpkg, "version": kversion, "release": release, "modules": order,
            "modules_key": tree.key, "modules_built": built}


def _busybox(root_tar: Path, work: Path) -> Path:
    """The root's static busybox, for the initramfs."""
    busybox = work / "busybox"
    with tarfile.open(root_tar) as tar:
        member = next((m for m in tar if m.name in ("./usr/bin/busybox", "./bin/busybox") and m.isfile()), None)
        src = tar.extractfile(member) if member is not None else None
        if src is None:
            raise ImageBuildError(f"{root_tar} has no /usr/bin/busybox; the base packages include busybox-static")
        busybox.write_bytes(src.read())
    return busybox


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
    order = kernel.build_initramfs(_busybox(root.tarball, work), init, moddir, out / IMAGE_FILES["initrd"],
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
            _rmtree(stale)  # left by a crashed build; we hold the key's lock
        if final.exists():  # incomplete, or from an older recipe: set aside, never reused
            old = roots / f".old-{key}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, old)
            _rmtree(old)
        staging = roots / f".staging-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        work = staging / "work"
        work.mkdir(parents=True)
        try:
            progress(f"vmfork: building guest image root {key[:12]} (Debian {aptsources.GUEST_SUITE} by "
                     f"mmdebstrap, {mode.name} mode; packages: {', '.join(base.packages) or 'base only'})")
            guest = guestfiles.guest_files()
            wheels = host_wheel_versions()
            site = work / "site"
            _install_wheels(wheels, Path(cache_dir) / "wheels", site)
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
            _rmtree(work)
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
            _rmtree(staging)
    root = _load_root(final)
    if root is None:
        raise ImageBuildError(f"Debian root {final} is incomplete right after its build; delete it and retry")
    return dataclasses.replace(root, built=True)


def _install_wheels(versions: Mapping[str, str], wheel_dir: Path, target: Path) -> None:
    """pip-download the host's exact versions as cp311 manylinux wheels and unpack them for the guest."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    fix = "check that PyPI has cp311 manylinux x86_64 wheels of these exact versions"
    with filelock.FileLock(str(wheel_dir / ".lock")):
        def wheel(dist: str) -> Path | None:
            stem = re.sub(r"[-_.]+", "_", dist).lower()
            return next(iter(sorted(wheel_dir.glob(f"{stem}-{versions[dist]}-*.whl"))), None)
        if missing := [f"{d}=={v}" for d, v in versions.items() if wheel(d) is None]:
            _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                  "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--platform",
                  "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "--no-deps",
                  "-d", wheel_dir, *missing], f"pip download {' '.join(missing)}", fix)
        files = [wheel(d) for d in versions]
        if None in files:
            raise ImageBuildError(f"pip download left no wheel for some of {dict(versions)} in {wheel_dir}; {fix}")
        _run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--no-index",
              "--no-compile", "--target", target, *files], "pip install --target of the guest wheels",
             f"delete {wheel_dir} so the wheels are downloaded again")
