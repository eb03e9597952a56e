"""Build and cache the guest image: a Debian kernel, a tiny initramfs and a read-only ext4 root.

The image is assembled from Debian packages (``apt-get download`` + ``dpkg -x``, no
debootstrap, no maintainer scripts) plus the host venv's exact grpcio/protobuf/pyroute2
wheels, so one generated gRPC module works on both sides. Everything is cached under
``cache_dir/images/<key>/``; the key covers exactly what shapes the image (see
:meth:`ImageSpec.key`), so ``apt-get update`` alone never forces a rebuild.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import lzma
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from .errors import ImageBuildError

#: Bump whenever this module changes what it puts into an image (the module's own
#: bytes are deliberately not hashed, so comment edits do not force rebuilds).
RECIPE_VERSION = 2

#: Kernel command line for booting an :class:`Image` under QEMU/TCG. ``panic=-1`` with
#: QEMU's ``-no-reboot`` turns a guest panic into a QEMU exit. The rest was measured to
#: shorten TCG boots and is safe for a throwaway test VM: ``cryptomgr.notests`` and the
#: blacklisted kdf108 initcall (it only runs a self-test) skip ~0.6 s of crypto
#: self-tests; ``init_on_alloc=0`` stops zeroing every kernel allocation (~0.3 s);
#: ``mitigations=off`` drops retpolines (TCG emulates no speculation anyway);
#: ``tsc=reliable`` keeps the clocksource watchdog from demoting the TSC to the HPET
#: (every HPET read is an emulated MMIO access) when a loaded host delays the vCPU.
#: ``random.trust_cpu=on`` (already the Debian default), ``8250.nr_uarts=1`` and
#: ``i8042.noaux i8042.nokbd`` made no measurable difference and were left out.
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 rdinit=/init"
    " mitigations=off tsc=reliable cryptomgr.notests initcall_blacklist=crypto_kdf108_init init_on_alloc=0"
)

#: Packages every guest gets: the interpreter for the agent, busybox for init and tools,
#: and libstdc++ which the manylinux grpcio and protobuf extension modules link against.
BASE_PACKAGES = ("python3", "busybox-static", "libstdc++6")

#: Packages never pulled in as *dependencies*: the root is assembled with ``dpkg -x``, so
#: maintainer scripts and package management never run in the guest. Listing one in
#: ``ImageSpec.packages`` keeps it (excluded dependencies of it must be listed too).
EXCLUDED_PACKAGES = frozenset({
    # Package management: nothing is installed or configured inside the guest.
    "dpkg", "apt", "debconf", "cdebconf", "install-info", "ucf", "init-system-helpers",
    # Tools only maintainer scripts use (python3-minimal depends on dpkg, dpkg on tar,
    # mime-support -> mailcap -> perl; Python only needs media-types' /etc/mime.types).
    "perl-base", "perl", "tar", "mailcap", "mime-support", "adduser", "passwd",
    "debianutils", "sensible-utils", "lsb-base",
    # Another init system (busybox init is PID 1) and usr-merge transition helpers.
    "systemd", "systemd-sysv", "sysvinit-utils", "usrmerge", "usr-is-merged",
})

#: Guest Python distributions, pinned to the host venv's versions. typing_extensions is
#: a runtime import of grpcio (grpc/_server.py), so the guest needs it as well.
GUEST_DISTRIBUTIONS = ("grpcio", "protobuf", "pyroute2", "typing_extensions")

#: Kernel modules loaded by the initramfs (with their dependencies). Ones that a
#: flavour builds in (e.g. ext4 in cloud-amd64) are skipped.
KERNEL_MODULES = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "overlay",
    "virtio_console", "virtio_net", "virtio_rng",
)

#: Busybox applets linked into the initramfs; guest/initramfs-init.sh uses only these.
INITRAMFS_APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "switch_root", "poweroff", "sleep", "cat")

#: Root-relative trees no guest needs (documentation, translations, packaging metadata).
PRUNED_TREES = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/lintian", "usr/share/bug", "usr/share/menu", "usr/share/pixmaps",
    "usr/share/applications", "usr/share/bash-completion", "usr/share/zsh",
)
#: Stdlib parts no guest uses: test suites, Tk GUI code (no display), ensurepip's wheels.
PRUNED_STDLIB = frozenset({"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip"})
STDLIB_DIR = "usr/lib/python3.11"

#: The project checkout: guest/ and the shared modules are copied into (and so shape) the image.
SOURCE_ROOT = Path(__file__).resolve().parent.parent
IMAGE_FILES = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.img"}
PVH_KERNEL = "vmlinux"  # uncompressed ELF kernel, built when it can be extracted (see extract_vmlinux)
_MiB = 1 << 20


@dataclass(frozen=True)
class ImageSpec:
    """What to put into a guest image; two equal specs always share one cached image."""

    kernel_flavour: str = "amd64"  # Debian flavour: "amd64" has VMGenID, "cloud-amd64" boots leaner
    packages: tuple[str, ...] = ()  # extra Debian packages (their dependency closure comes too)
    files: tuple[tuple[str, bytes], ...] = ()  # (absolute guest path, content); 0755 if it starts with b"#!"

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

    def key(self) -> str:
        """Cache key: sha256 of everything that shapes the image, from the current sources and venv."""
        return compute_key(self, SOURCE_ROOT, host_wheel_versions())

    def describe(self) -> dict[str, Any]:
        """JSON-able form of the spec for manifest.json (file contents as hashes)."""
        return {
            "kernel_flavour": self.kernel_flavour,
            "packages": sorted(set(self.packages)),
            "files": {p: {"sha256": hashlib.sha256(c).hexdigest(), "size": len(c)} for p, c in sorted(self.files)},
        }


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
    manifest: dict[str, Any]


def key_sources(source_root: Path) -> list[Path]:
    """Project files copied into the guest: everything under guest/, mailbox.py, proto/*.py."""
    guest = source_root / "guest"
    found = [p for p in guest.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    pkg = source_root / "pytest_vmfork"
    found += [p for p in [pkg / "mailbox.py", *sorted((pkg / "proto").glob("*.py"))] if p.is_file()]
    return sorted(found)


def compute_key(spec: ImageSpec, source_root: Path, wheel_versions: Mapping[str, str]) -> str:
    """The cache key for ``spec`` given the project sources and guest wheel versions.

    Resolved Debian package versions are deliberately left out: the image records them
    in its manifest, but a mirror update should not force every user to rebuild.
    """
    doc = {
        "recipe": RECIPE_VERSION,
        **spec.describe(),
        "sources": {p.relative_to(source_root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                    for p in key_sources(source_root)},
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


# --- pure helpers (unit tested) ------------------------------------------------------------

def parse_apt_depends(text: str) -> dict[str, list[list[str]]]:
    """Parse ``apt-cache depends --recurse`` output into package -> dependency groups.

    Each group lists the concrete packages that satisfy it, in apt's preference order:
    ``|Depends:`` alternatives are merged into one group and a virtual ``<name>`` is
    replaced by its providers (the indented lines after it).
    """
    graph: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    group: list[str] | None = None  # the group a "|" alternative left open
    last: list[str] | None = None  # the group providers are appended to
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            current = graph.setdefault(line.strip(), [])
            group = last = None
        elif m := re.match(r"^ ([ |])(\w+): (\S+)", line):
            if current is None or m[2] not in ("Depends", "PreDepends"):
                last = None
                continue
            if group is None:
                group = []
                current.append(group)
            name = m[3].removesuffix(":any")
            if not name.startswith("<") and ":" not in name:
                group.append(name)
            last = group
            group = group if m[1] == "|" else None
        elif line.startswith("    ") and last is not None:
            last.append(line.strip().removesuffix(":any"))
    return graph


def package_closure(graph: Mapping[str, list[list[str]]], roots: Iterable[str],
                    excluded: Iterable[str] = EXCLUDED_PACKAGES) -> list[str]:
    """Sorted dependency closure of ``roots``; excluded packages are kept only if they are roots."""
    roots = list(dict.fromkeys(roots))
    skip = set(excluded) - set(roots)
    chosen: set[str] = set()
    queue = list(roots)
    while queue:
        pkg = queue.pop(0)
        if pkg in chosen:
            continue
        chosen.add(pkg)
        for group in graph.get(pkg, []):
            if any(c in chosen or c in queue for c in group):
                continue
            pick = next((c for c in group if c not in skip and c in graph), None)
            if pick is not None:
                queue.append(pick)
    return sorted(chosen)


def should_prune(rel: str) -> bool:
    """Whether root-relative path ``rel`` (e.g. "usr/share/doc/x") is left out of the guest."""
    parts = rel.strip("/").split("/")
    if "__pycache__" in parts:  # recompiled by the guest's own python at the end
        return True
    if any(rel == t or rel.startswith(t + "/") for t in PRUNED_TREES):
        return True
    return rel.startswith(STDLIB_DIR + "/") and bool(PRUNED_STDLIB & set(parts[3:]))


def _modname(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse a modules.dep file: module name -> (path, paths of the modules it depends on)."""
    deps = {}
    for line in text.splitlines():
        if ":" in line:
            path, rest = line.split(":", 1)
            deps[_modname(path.strip())] = (path.strip(), rest.split())
    return deps


def module_load_order(modules_dep: str, wanted: Iterable[str], builtin: Iterable[str] = ()) -> list[str]:
    """Paths of ``wanted`` modules and their dependencies, each after all of its dependencies."""
    deps = parse_modules_dep(modules_dep)
    built = {_modname(b) for b in builtin}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _modname(name)
        if name in built or (name in deps and deps[name][0] in order):
            return
        if name not in deps:
            raise ImageBuildError(f"kernel module {name!r} is neither a module nor built in; "
                                  "use a kernel flavour that provides it")
        if name in visiting:
            raise ImageBuildError(f"kernel module dependency cycle at {name!r}")
        visiting.add(name)
        for dep in deps[name][1]:
            visit(dep)
        visiting.discard(name)
        order.append(deps[name][0])

    for name in wanted:
        visit(name)
    return order


def modules_dep_from_modinfo(moddir: Path) -> str:
    """modules.dep text built from each .ko's modinfo ``depends=`` (Debian's kernel package
    ships no modules.dep: its postinst runs depmod, which never runs here)."""
    pattern = re.compile(rb"\x00depends=([^\x00]*)\x00")
    paths = {_modname(p.name): p.relative_to(moddir).as_posix() for p in moddir.rglob("*.ko*")}
    lines = []
    for name, rel in sorted(paths.items()):
        m = pattern.search((moddir / rel).read_bytes())
        names = m[1].decode().split(",") if m and m[1] else []
        lines.append(f"{rel}: " + " ".join(paths[_modname(n)] for n in names if _modname(n) in paths))
    return "\n".join(lines) + "\n"


def newc_archive(entries: Iterable[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (path, mode, data, rdev) entries, owned by root, mtime 0.

    Written here so device nodes need no mknod and the bytes are reproducible. Missing
    parent directories are added first: the kernel's unpacker does not create them.
    """
    out = bytearray()
    seen: set[str] = set()

    def add(name: str, mode: int, data: bytes, rdev: int) -> None:
        nonlocal out
        fields = (len(seen) + 1, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev), len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data + b"\0" * (-len(data) % 4)
        seen.add(name)

    for name, mode, data, rdev in entries:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) not in seen:
                add("/".join(parts[:i]), 0o40755, b"", 0)
        if name not in seen:
            add(name, mode, data, rdev)
    add("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, or None if it cannot be extracted here.

    Booting the ELF (QEMU uses its PVH entry note) skips the bzImage's self-decompression,
    which is slow under TCG. xz and gzip use the stdlib; lz4 and zstd need their CLI tools.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    offset, length = struct.unpack_from("<II", bzimage, 0x248)  # relative to the protected-mode code
    start = ((bzimage[0x1F1] or 4) + 1) * 512 + offset
    payload = bzimage[start:start + length - 4]  # the kernel build appends the size (le32)
    size = int.from_bytes(bzimage[start + length - 4:start + length], "little")
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            data = lzma.LZMADecompressor().decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            data = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            tool = {b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd"}.get(payload[:4])
            if tool is None or shutil.which(tool) is None:
                return None
            data = subprocess.run([tool, "-dc"], input=payload, capture_output=True, check=True).stdout
    except (lzma.LZMAError, zlib.error, OSError, subprocess.CalledProcessError):
        return None
    return data if data[:4] == b"\x7fELF" and len(data) == size else None


# --- build -------------------------------------------------------------------------------

def _tail(text: str | None, lines: int = 6) -> str:
    return " | ".join((text or "").strip().splitlines()[-lines:]) or "(no output)"


def _run(cmd: Sequence[object], what: str, fix: str, **kw: Any) -> str:
    """Run ``cmd``; on failure raise ImageBuildError naming ``what`` failed and the ``fix``."""
    try:
        return str(subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                                  errors="replace", **kw).stdout)
    except FileNotFoundError as e:
        raise ImageBuildError(f"{what} failed: {cmd[0]} is not installed; {fix}") from e
    except subprocess.CalledProcessError as e:
        raise ImageBuildError(f"{what} failed (exit {e.returncode}): {_tail(e.stderr or e.stdout)}; {fix}") from e


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def cached_image(spec: ImageSpec, cache_dir: Path) -> Image | None:
    """The complete cached image for ``spec``, or None; never builds."""
    return _load(Path(cache_dir) / "images" / spec.key())


def _load(d: Path) -> Image | None:
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        files = manifest["files"]
        if manifest["key"] != d.name or not set(IMAGE_FILES.values()) <= set(files) \
                or any((d / n).stat().st_size != s for n, s in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    paths = {k: d / v for k, v in IMAGE_FILES.items()}
    if PVH_KERNEL in manifest["files"]:
        paths["kernel"] = d / PVH_KERNEL
    return Image(key=d.name, dir=d, manifest=manifest, **paths)


def build_image(spec: ImageSpec, cache_dir: Path, *, progress: Callable[[str], None] = lambda s: None,
                force: bool = False) -> Image:
    """Return the image for ``spec``, building it unless a complete one is cached.

    Concurrent callers (xdist workers, parallel runs) build it once: the build holds a
    per-key file lock, happens in a staging dir and is published with an atomic rename.
    """
    key = spec.key()
    images = Path(cache_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    final = images / key
    if not force and (image := _load(final)):
        progress(f"image {key[:12]} cached")
        return image
    lock = filelock.FileLock(str(images / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        progress(f"waiting for another process building image {key[:12]}")
        lock.acquire()
    try:
        if not force and (image := _load(final)):
            progress(f"image {key[:12]} built by another process")
            return image
        for stale in [*images.glob(f".staging-{key}-*"), *images.glob(f".old-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by crashed builds; we hold the key's lock
        staging = images / f".staging-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _build(spec, key, Path(cache_dir), staging, progress)
            if final.exists():  # force: move the old image aside; running VMs keep their open files
                old = images / f".old-{key}-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    image = _load(final)
    if image is None:
        raise ImageBuildError(f"image {final} is incomplete right after its build; delete it and retry")
    return image


def _build(spec: ImageSpec, key: str, cache_dir: Path, out: Path, progress: Callable[[str], None]) -> None:
    start = time.monotonic()
    for name in ("inittab", "rc.sh", "initramfs-init.sh"):
        if not (SOURCE_ROOT / "guest" / name).is_file():
            raise ImageBuildError(f"{SOURCE_ROOT / 'guest' / name} is missing; the guest image is built from "
                                  "the project's guest/ directory: run from a complete checkout")
    if not (SOURCE_ROOT / "guest/agent.py").is_file() and "/opt/vmfork/agent.py" not in dict(spec.files):
        raise ImageBuildError(f"no guest agent: {SOURCE_ROOT / 'guest/agent.py'} is missing and ImageSpec.files "
                              "has no /opt/vmfork/agent.py; restore guest/agent.py")
    work, root = out / "work", out / "work" / "root"
    root.mkdir(parents=True)
    arch = _run(["dpkg", "--print-architecture"], "dpkg --print-architecture", "build on a Debian host").strip()
    if arch != "amd64":
        raise ImageBuildError(f"the guest is x86_64 but this host's Debian architecture is {arch}; build on amd64")

    progress("resolving packages")
    kpkg = _kernel_package(spec.kernel_flavour)
    fix = "check the names with apt-cache policy NAME (run apt-get update if the index is empty)"
    deps = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                 "--no-breaks", "--no-replaces", "--no-enhances", *BASE_PACKAGES, *spec.packages],
                f"apt-cache depends for {' '.join([*BASE_PACKAGES, *spec.packages])}", fix)
    graph = parse_apt_depends(deps)
    for name in spec.packages:
        if name not in graph:
            raise ImageBuildError(f"package {name!r} is virtual or unknown to apt; name a real package "
                                  f"(apt-cache showpkg {name} lists its providers)")
    packages = package_closure(graph, [*BASE_PACKAGES, *spec.packages])
    debs = _download_debs([*packages, kpkg], cache_dir / "debs", progress)

    progress(f"extracting {len(packages)} packages")
    for name in packages:
        _run(["dpkg", "-x", debs[name][1], root], f"dpkg -x {debs[name][1].name}",
             f"delete {debs[name][1]} so it is downloaded again")
    _prune(root)
    _essentials(root)

    progress("extracting kernel")
    kdir = work / "kernel"
    _run(["dpkg", "-x", debs[kpkg][1], kdir], f"dpkg -x {debs[kpkg][1].name}", f"delete {debs[kpkg][1]}")
    (release,) = [p.name for p in (kdir / "lib/modules").iterdir()]
    bzimage = (kdir / f"boot/vmlinuz-{release}").read_bytes()
    (out / IMAGE_FILES["kernel"]).write_bytes(bzimage)
    pvh = "CONFIG_PVH=y" in (kdir / f"boot/config-{release}").read_text().split()
    if pvh and (vmlinux := extract_vmlinux(bzimage)):
        (out / PVH_KERNEL).write_bytes(vmlinux)

    wheels = host_wheel_versions()
    progress(f"installing wheels {', '.join(f'{d}=={v}' for d, v in wheels.items())}")
    _install_wheels(wheels, cache_dir / "wheels", root / "opt/vmfork/site")
    _install_vmfork(root)
    for path, content in spec.files:
        _write(root / path.lstrip("/"), content, 0o755 if content.startswith(b"#!") else 0o644)

    progress("compiling bytecode")
    shm = root / "dev/shm"  # compileall -j0's process pool needs sem_open(), i.e. files in /dev/shm
    shm.mkdir(parents=True)
    _run(["chroot", root, "/usr/bin/python3", "-m", "compileall", "-q", "-j0",
          f"/{STDLIB_DIR}", "/usr/lib/python3/dist-packages", "/opt/vmfork"],
         "byte-compiling with the guest's python (chroot)", "the build must run as root (chroot)")
    shutil.rmtree(shm)

    tree = list(root.rglob("*"))
    used = sum(-(-p.lstat().st_size // 4096) * 4096 for p in tree)  # in 4 KiB blocks
    progress(f"building ext4 root ({used // _MiB} MiB of files)")
    rootfs = out / IMAGE_FILES["rootfs"]
    size = -(-(used + max(used // 5, 64 * _MiB)) // _MiB) * _MiB
    with open(rootfs, "wb") as f:
        f.truncate(size)
    inodes = len(tree) * 5 // 4 + 1024
    uuid = f"{key[:8]}-{key[8:12]}-{key[12:16]}-{key[16:20]}-{key[20:32]}"
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", root, "-L", "vmfork-root", "-U", uuid, "-b", "4096", "-m", "0",
          "-N", inodes, "-E", f"root_owner=0:0,hash_seed={uuid}", "-O", "^has_journal", rootfs],
         "mke2fs of the root filesystem", "apt-get install e2fsprogs (1.43+ for mke2fs -d)")

    progress("building initramfs")
    order = _initramfs(root, kdir / "lib/modules" / release, out / IMAGE_FILES["initrd"])

    manifest: dict[str, Any] = {
        "key": key, "recipe_version": RECIPE_VERSION, "spec": spec.describe(),
        "kernel": {"package": kpkg, "version": debs[kpkg][0], "release": release, "modules": order},
        "debs": {name: debs[name][0] for name in packages}, "wheels": wheels,
        "files": {n: (out / n).stat().st_size for n in [*IMAGE_FILES.values(), PVH_KERNEL] if (out / n).exists()},
        "root_content_bytes": used, "build_seconds": round(time.monotonic() - start, 1),
    }
    shutil.rmtree(work)
    for name in manifest["files"]:  # shared by every VM: guard against accidental writes
        (out / name).chmod(0o444)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    progress(f"image {key[:12]} built in {manifest['build_seconds']} s")


def _kernel_package(flavour: str) -> str:
    meta = f"linux-image-{flavour}"
    text = _run(["apt-cache", "depends", meta], f"apt-cache depends {meta}",
                f"check the flavour with apt-cache policy {meta} (run apt-get update if the index is empty)")
    m = re.search(r"Depends: (linux-image-\S+)", text)
    if not m:
        raise ImageBuildError(f"{meta} names no kernel package: {_tail(text)}; check apt-cache depends {meta}")
    for name in (f"{m[1]}-unsigned", m[1]):  # same kernel; -unsigned skips the secure-boot wrapper
        if subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True, check=False).returncode == 0:
            return name
    raise ImageBuildError(f"kernel package {m[1]} has no candidate; run apt-get update")


def _download_debs(names: list[str], debs_dir: Path, progress: Callable[[str], None]) -> dict[str, tuple[str, Path]]:
    """Candidate version and local .deb of each package, downloading only missing ones."""
    fix = "check the package names with apt-cache policy NAME, and run apt-get update if the mirror moved on"
    info: dict[str, tuple[str, Path, int]] = {}
    for stanza in _run(["apt-cache", "show", "--no-all-versions", *names], "apt-cache show", fix).split("\n\n"):
        f = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.MULTILINE))
        if f.get("Package") in names and f.get("Architecture") in ("amd64", "all") and f["Package"] not in info:
            deb = f"{f['Package']}_{f['Version'].replace(':', '%3a')}_{f['Architecture']}.deb"
            info[f["Package"]] = (f["Version"], debs_dir / deb, int(f["Size"]))
    if missing := sorted(set(names) - set(info)):
        raise ImageBuildError(f"apt knows no amd64 candidate for {', '.join(missing)}; {fix}")
    debs_dir.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(debs_dir / ".lock")):
        todo = [n for n in names if not (info[n][1].is_file() and info[n][1].stat().st_size == info[n][2])]
        progress(f"downloading {len(todo)} debs ({len(names) - len(todo)} cached)")
        if todo:
            what = f"package {todo[0]!r}" if len(todo) == 1 else f"packages {', '.join(todo)}"
            _run(["apt-get", "download", *(f"{n}={info[n][0]}" for n in todo)],
                 f"apt-get download of {what}", fix, cwd=debs_dir)
        for n in todo:
            if not info[n][1].is_file():
                raise ImageBuildError(f"apt-get download did not produce {info[n][1]}; {fix}")
    return {n: (v, p) for n, (v, p, _) in info.items()}


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


def _install_vmfork(root: Path) -> None:
    """The agent and the host modules it shares, as a minimal ``pytest_vmfork`` package."""
    opt, src = root / "opt/vmfork", SOURCE_ROOT / "pytest_vmfork"
    if (SOURCE_ROOT / "guest/agent.py").is_file():
        _write(opt / "agent.py", (SOURCE_ROOT / "guest/agent.py").read_bytes())
    _write(root / "usr/local/bin/vmfork-ack", (SOURCE_ROOT / "guest/vmfork-ack").read_bytes(), 0o755)
    _write(opt / "pytest_vmfork/__init__.py", b"")  # not the host's: that one imports the plugin
    if (src / "mailbox.py").is_file():
        _write(opt / "pytest_vmfork/mailbox.py", (src / "mailbox.py").read_bytes())
    _write(opt / "pytest_vmfork/proto/__init__.py", b"")
    for p in sorted((src / "proto").glob("*.py")):
        _write(opt / "pytest_vmfork/proto" / p.name, p.read_bytes())


def _prune(root: Path) -> None:
    """Delete everything :func:`should_prune` rejects."""
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in list(dirnames):
            path = base / name
            if should_prune(path.relative_to(root).as_posix()):
                dirnames.remove(name)
                if path.is_symlink():
                    path.unlink()
                else:
                    shutil.rmtree(path)
        for name in filenames:
            if should_prune((base / name).relative_to(root).as_posix()):
                (base / name).unlink()


def _essentials(root: Path) -> None:
    """What a package-manager-free root needs: users, names, mount points, init, ld.so.cache."""
    _write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    _write(root / "etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    _write(root / "etc/hostname", "vmfork\n")
    _write(root / "etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tvmfork\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    _write(root / "etc/resolv.conf", "")
    _write(root / "etc/inittab", (SOURCE_ROOT / "guest/inittab").read_bytes())
    _write(root / "etc/vmfork/rc.sh", (SOURCE_ROOT / "guest/rc.sh").read_bytes(), 0o755)
    for d, mode in [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                    ("mnt", 0o755), ("root", 0o700)]:
        (root / d).mkdir(exist_ok=True)
        (root / d).chmod(mode)
    applets = _run([root / "bin/busybox", "--list-full"], "busybox --list-full", "check the busybox-static package")
    for rel in applets.split():
        if rel == "linuxrc":  # busybox's initrd-era init alias, useless here
            continue
        link = root / rel
        if rel == "sbin/init" or not (link.exists() or link.is_symlink()):
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to("/bin/busybox")
    # Without /etc/ld.so.cache every library lookup probes many directories: slow under TCG.
    _write(root / "etc/ld.so.conf", "include /etc/ld.so.conf.d/*.conf\n")
    _run(["ldconfig", "-r", root], "ldconfig -r (guest library cache)", "apt-get install libc-bin")


def _initramfs(root: Path, moddir: Path, out: Path) -> list[str]:
    """Write the gzip'ed newc initramfs: busybox, /init, the root's kernel modules; return their order."""
    builtin = (moddir / "modules.builtin").read_text().split()
    order = module_load_order(modules_dep_from_modinfo(moddir), KERNEL_MODULES, builtin)
    kmods = f"lib/modules/{moddir.name}"
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o40755, b"", 0) for d in ("bin", "dev", "etc", "proc", "sys", "lower", "rw", "newroot")]
    entries.append(("dev/console", 0o20600, b"", os.makedev(5, 1)))  # the kernel opens it before /init runs
    entries.append(("bin/busybox", 0o100755, (root / "bin/busybox").read_bytes(), 0))
    entries += [(f"bin/{a}", 0o120777, b"busybox", 0) for a in INITRAMFS_APPLETS]
    entries.append(("init", 0o100755, (SOURCE_ROOT / "guest/initramfs-init.sh").read_bytes(), 0))
    entries.append(("etc/modules.order", 0o100644, "".join(f"/{kmods}/{p}\n" for p in order).encode(), 0))
    entries += [(f"{kmods}/{p}", 0o100644, (moddir / p).read_bytes(), 0) for p in order]
    out.write_bytes(gzip.compress(newc_archive(entries), compresslevel=9, mtime=0))
    return order
