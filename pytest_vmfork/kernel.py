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
from pathlib import Path

from .errors import ImageBuildError

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
    "virtio_console", "virtio_net", "virtio_rng",
)

#: Busybox applets linked into the initramfs; guest/initramfs-init.sh uses only these.
INITRAMFS_APPLETS = ("sh", "mount", "umount", "mkdir", "insmod", "switch_root", "poweroff", "sleep", "cat")


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



def build_initramfs(busybox: Path, init_script: bytes, moddir: Path, out: Path) -> list[str]:
    """Write the gzip'ed newc initramfs: busybox, /init, the kernel modules; return their order."""
    builtin = (moddir / "modules.builtin").read_text().split()
    order = module_load_order(modules_dep_from_modinfo(moddir), KERNEL_MODULES, builtin)
    kmods = f"lib/modules/{moddir.name}"
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o40755, b"", 0) for d in ("bin", "dev", "etc", "proc", "sys", "lower", "rw", "newroot")]
    entries.append(("dev/console", 0o20600, b"", os.makedev(5, 1)))  # the kernel opens it before /init runs
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes(), 0))
    entries += [(f"bin/{a}", 0o120777, b"busybox", 0) for a in INITRAMFS_APPLETS]
    entries.append(("init", 0o100755, init_script, 0))
    entries.append(("etc/modules.order", 0o100644, "".join(f"/{kmods}/{p}\n" for p in order).encode(), 0))
    entries += [(f"{kmods}/{p}", 0o100644, (moddir / p).read_bytes(), 0) for p in order]
    out.write_bytes(gzip.compress(newc_archive(entries), compresslevel=9, mtime=0))
    return order
