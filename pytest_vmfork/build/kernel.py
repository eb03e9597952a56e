"""The guest kernel: unpack Debian's kernel package, extract a bootable ELF, build the initramfs.

Pure helpers, no apt and no root: the kernel ``.deb`` is fetched inside the guest root
while mmdebstrap builds it (guest/fetch-kernel.sh) and unpacked here with the stdlib,
so the host needs neither dpkg nor the guest's distribution.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pytest_vmfork.errors import ConfigError, ImageBuildError

#: Kernel command line for booting an image under QEMU/TCG. ``panic=-1`` with
#: QEMU's ``-no-reboot`` turns a guest panic into a QEMU exit. The rest was measured to
#: shorten TCG boots and is safe for a throwaway test VM: ``cryptomgr.notests`` and the
#: blacklisted kdf108 initcall (it only runs a self-test) skip ~0.6 s of crypto
#: self-tests; ``init_on_alloc=0`` stops zeroing every kernel allocation (~0.3 s);
#: ``mitigations=off`` drops retpolines (TCG emulates no speculation anyway);
#: ``tsc=reliable`` keeps the clocksource watchdog from demoting the TSC to the HPET
#: (every HPET read is an emulated MMIO access) when a loaded host delays the vCPU;
#: ``no_timer_check`` skips the IO-APIC timer check, which a loaded TCG host fails
#: ("IO-APIC + timer doesn't work", a panic at boot, seen in CI-like runs).
KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 rdinit=/init"
    " mitigations=off tsc=reliable no_timer_check cryptomgr.notests initcall_blacklist=crypto_kdf108_init"
    " init_on_alloc=0"
)

#: Kernel modules loaded by the initramfs (with their dependencies). Ones that a
#: flavour builds in (e.g. ext4 in cloud-amd64) are skipped.
KERNEL_MODULES = (
    "virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "overlay",
    "virtio_console", "virtio_net", "virtio_rng", "squashfs",
)

#: Busybox applets linked into the initramfs; guest/initramfs-init.sh uses only these.
INITRAMFS_APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "switch_root", "poweroff", "sleep", "cat",
                     "uname")


def unpack_deb(deb: Path, dest: Path, prefixes: Iterable[str] = ("boot/", "lib/modules/", "usr/lib/modules/")) -> None:
    """Unpack the members of ``deb``'s data archive under ``prefixes`` into ``dest``.

    A .deb is an ``ar`` archive whose ``data.tar.*`` member holds the files; reading it
    here keeps the host free of dpkg. Only regular files, directories and symlinks are
    written, and only inside ``dest``.
    """
    wanted = tuple(prefixes)
    try:
        with open(deb, "rb") as f:
            if f.read(8) != b"!<arch>\n":
                raise ImageBuildError(f"{deb} is not a Debian package (no ar header); delete it and rebuild")
            while header := f.read(60):
                if len(header) < 60:
                    break
                name = header[:16].decode().strip().rstrip("/")
                size = int(header[48:58].decode().strip())
                if name.startswith("data.tar"):
                    data = f.read(size)
                    break
                f.seek(size + (size & 1), os.SEEK_CUR)
            else:
                raise ImageBuildError(f"{deb} has no data.tar member")
    except (OSError, ValueError) as exc:
        raise ImageBuildError(f"cannot read kernel package {deb}: {exc}") from exc
    if name.endswith(".zst"):
        data = _run_filter(["zstd", "-dc"], data, "zstd (apt-get install zstd)")
    dest_abs = dest.resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            rel = member.name.removeprefix("./")
            if not rel.startswith(wanted) or not (member.isfile() or member.isdir() or member.issym()):
                continue
            target = (dest_abs / rel).resolve() if not member.issym() else dest_abs / rel
            if not str(target).startswith(str(dest_abs) + os.sep):
                raise ImageBuildError(f"kernel package {deb} has a member outside its root: {member.name}")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.issym():
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink() or target.exists():
                    target.unlink()
                target.symlink_to(member.linkname)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)


def _run_filter(cmd: list[str], data: bytes, fix: str) -> bytes:
    try:
        return subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ImageBuildError(f"{cmd[0]} failed to decompress the kernel package: {exc}; {fix}") from exc


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



def build_initramfs(busybox: Path, init_script: bytes, moddir: Path | None, out: Path, *,
                    strict: bool = True) -> list[str]:
    """Write the gzip'ed newc initramfs: busybox, /init, the kernel modules; return their order.

    ``moddir`` None: a kernel with everything built in (no modules). ``strict`` False (a
    user's kernel, whose config was checked): modules it neither has nor builds in are skipped."""
    order: list[str] = []
    if moddir is not None:
        builtin = (moddir / "modules.builtin").read_text().split() if (moddir / "modules.builtin").exists() else []
        dep = modules_dep_from_modinfo(moddir)
        wanted = KERNEL_MODULES if strict else [m for m in KERNEL_MODULES if m in parse_modules_dep(dep)]
        order = module_load_order(dep, wanted, builtin)
    kmods = f"lib/modules/{moddir.name if moddir else 'none'}"
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o40755, b"", 0) for d in ("bin", "dev", "etc", "proc", "sys", "lower", "rw", "newroot")]
    entries.append(("dev/console", 0o20600, b"", os.makedev(5, 1)))  # the kernel opens it before /init runs
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes(), 0))
    entries += [(f"bin/{a}", 0o120777, b"busybox", 0) for a in INITRAMFS_APPLETS]
    entries.append(("init", 0o100755, init_script, 0))
    entries.append(("etc/modules.order", 0o100644, "".join(f"/{kmods}/{p}\n" for p in order).encode(), 0))
    entries += [(f"{kmods}/{p}", 0o100644, (moddir / p).read_bytes(), 0) for p in order if moddir]
    out.write_bytes(gzip.compress(newc_archive(entries), compresslevel=9, mtime=0))
    return order


# --- a kernel of the user's own -------------------------------------------------------------

#: What a fork needs of a kernel: (option, accepted values, why). "m" is accepted only
#: when a module tree is given (the initramfs loads it from there). VMGenID is required:
#: without it every fork of a snapshot continues the snapshot's kernel RNG state, so
#: two forks read the same "random" bytes from /dev/urandom until something reseeds it.
REQUIRED_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("CONFIG_64BIT", "y", "a 64-bit x86 kernel"),
    ("CONFIG_BLK_DEV_INITRD", "y", "initramfs support (vmfork boots through its own initramfs)"),
    ("CONFIG_RD_GZIP", "y", "gzip-compressed initramfs"),
    ("CONFIG_DEVTMPFS", "y", "devtmpfs for /dev"),
    ("CONFIG_BINFMT_SCRIPT", "y", "#! scripts (the guest's init scripts)"),
    ("CONFIG_SERIAL_8250_CONSOLE", "y", "the ttyS0 console (boot messages and failures reach the host)"),
    ("CONFIG_PCI", "y", "PCI (every vmfork device is a PCI device)"),
    ("CONFIG_VIRTIO_PCI", "ym", "virtio over PCI"),
    ("CONFIG_VIRTIO_BLK", "ym", "virtio block devices (the root disk)"),
    ("CONFIG_VIRTIO_NET", "ym", "the virtio network card"),
    ("CONFIG_VIRTIO_CONSOLE", "ym", "virtio console ports (the host<->agent channel)"),
    ("CONFIG_EXT4_FS", "ym", "ext4 (the root disk)"),
    ("CONFIG_OVERLAY_FS", "ym", "overlayfs (the writable root over the shared read-only disk)"),
    ("CONFIG_TMPFS", "y", "tmpfs (the root's writable layer)"),
    ("CONFIG_UNIX", "ym", "Unix sockets"),
    ("CONFIG_INET", "y", "TCP/IP networking"),
    ("CONFIG_VMGENID", "y", ("the VM generation ID driver: without it every fork continues the snapshot's "
                             "random number state and reads the same bytes from /dev/urandom")),
)
#: Needed in addition when a module tree is attached (mounted as squashfs in the initramfs).
MODULE_TREE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("CONFIG_MODULES", "y", "loadable modules (kernel_modules= was given)"),
    ("CONFIG_SQUASHFS", "ym", "squashfs (the module tree's disk)"),
    ("CONFIG_SQUASHFS_ZSTD", "y", "zstd-compressed squashfs (the module tree's disk)"),
)
KERNEL_DOC = "see docs/kernel.md for the minimal config"


@dataclass(frozen=True)
class UserKernel:
    """A kernel file handed in by the user: its kind, release and config (if found)."""

    path: Path
    kind: str  # "bzImage" or "elf"
    release: str
    config: dict[str, str] | None  # CONFIG_X -> value ("y", "m", ...)
    config_source: str  # where the config was read from, or why none was found

    def problems(self, with_modules: bool) -> list[str]:
        """One line per missing option, naming it, what it is for, and the fix."""
        if self.config is None:
            return [(f"kernel {self.path}: cannot check its config ({self.config_source}); build it with "
                     f"CONFIG_IKCONFIG=y or put its .config beside it as config-{self.release}")]
        out = []
        for option, accepted, why in (*REQUIRED_OPTIONS, *(MODULE_TREE_OPTIONS if with_modules else ())):
            value = self.config.get(option, "n")
            ok = value in accepted and (value != "m" or with_modules)
            if ok:
                continue
            if value == "m":
                out.append(f"kernel {self.path}: {option}=m but no kernel_modules= was given: set {option}=y "
                           f"or pass the module tree ({why})")
            else:
                want = "=y" if accepted == "y" else "=y (or =m with kernel_modules=)"
                out.append(f"kernel {self.path}: {option} is not set, a fork needs {why}: set {option}{want}; "
                           f"{KERNEL_DOC}")
        return out


def inspect_kernel_header(path: Path) -> tuple[str, str, bytes]:
    """(kind, release, bytes) of a kernel file: "bzImage" or "elf" (an ELF vmlinux);
    ConfigError if ``path`` is not a Linux x86-64 kernel at all."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Template kernel={str(path)!r}: cannot read it: {exc.strerror}") from exc
    if len(data) >= 0x250 and data[0x202:0x206] == b"HdrS":
        kind = "bzImage"
        at = int.from_bytes(data[0x20E:0x210], "little") + 0x200
        release = data[at:at + 256].split(b"\0")[0].split(b" ")[0].decode(errors="replace")
    elif data[:4] == b"\x7fELF" and len(data) > 64 and data[4] == 2 and data[18:20] == b"\x3e\x00":
        kind = "elf"
        m = re.search(rb"Linux version (\S+) ", data)
        release = m[1].decode(errors="replace") if m else ""
    else:
        raise ConfigError(f"Template kernel={str(path)!r} is not a Linux x86-64 kernel image (neither a bzImage "
                          "nor an ELF vmlinux); pass arch/x86/boot/bzImage of your build")
    if not release:
        raise ConfigError(f"Template kernel={str(path)!r}: no kernel version string found in it; pass "
                          "arch/x86/boot/bzImage of your build")
    return kind, release, data


def inspect_kernel(path: Path) -> UserKernel:
    """Identify ``path`` as a bootable x86 kernel (bzImage or ELF vmlinux), read its release
    and its config: embedded (CONFIG_IKCONFIG) or a config file beside it. ConfigError if
    it is not a kernel at all."""
    kind, release, data = inspect_kernel_header(path)
    vmlinux = extract_vmlinux(data) if kind == "bzImage" else data
    config, source = _embedded_config(vmlinux) if vmlinux else (None, "")
    if config is None:
        config, source = _config_beside(path, release)
    return UserKernel(path, kind, release, config, source)


def parse_config(text: str) -> dict[str, str]:
    """A kernel .config as CONFIG_X -> value; "is not set" lines are left out."""
    out = {}
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name.startswith("CONFIG_"):
            out[name] = value.strip().strip('"')
    return out


def _embedded_config(vmlinux: bytes) -> tuple[dict[str, str] | None, str]:
    start = vmlinux.find(b"IKCFG_ST")
    end = vmlinux.find(b"IKCFG_ED", start)
    if start < 0 or end < 0:
        return None, ""
    try:
        return parse_config(gzip.decompress(vmlinux[start + 8:end]).decode(errors="replace")), "CONFIG_IKCONFIG"
    except (OSError, EOFError, zlib.error):
        return None, ""


def _config_beside(path: Path, release: str) -> tuple[dict[str, str] | None, str]:
    """config-<release> or .config beside the kernel, or the .config of the source tree
    it was built in (arch/x86/boot/bzImage -> ../../../.config)."""
    candidates = [path.parent / f"config-{release}", path.parent / "config", path.parent / ".config",
                  *(p / ".config" for p in list(path.resolve().parents)[:4])]
    for candidate in candidates:
        if candidate.is_file():
            return parse_config(candidate.read_text(errors="replace")), str(candidate)
    return None, "no embedded config (CONFIG_IKCONFIG) and no config-<release> or .config beside it"


def find_module_tree(path: Path) -> Path:
    """The ``lib/modules/<release>`` directory in ``path``: that directory itself or an
    INSTALL_MOD_PATH holding exactly one."""
    if (path / "modules.order").is_file() or (path / "modules.builtin").is_file():
        return path
    base = path / "lib" / "modules"
    trees = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if len(trees) == 1:
        return trees[0]
    what = f"holds {len(trees)} trees under lib/modules" if trees else "is not a module tree"
    raise ConfigError(f"Template kernel_modules={str(path)!r} {what}; pass the lib/modules/<release> "
                      "directory that `make modules_install INSTALL_MOD_PATH=DIR` wrote (or DIR itself)")
