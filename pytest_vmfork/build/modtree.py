"""Kernel module trees: every module of the guest's kernel on a compressed read-only disk.

A tree is built once per kernel (its content is the key: neither the template's
packages nor its files), depmod'ed on the host so ``modules.dep``, ``modules.alias``
and friends are right for ``modprobe`` and the kernel's on-demand loading, and packed
into a zstd squashfs (~90 MiB for Debian's 390 MiB tree). Every VM gets it as a
second read-only virtio disk that the initramfs mounts at ``/lib/modules/<release>``:
shared by every image and fork, read only for the modules a guest loads.

Entries live under ``cache_dir/modules/<key>/`` with a manifest (release, module
names, file sizes); like images they are staged, sealed and renamed into place under
a per-key lock, verified before use, and found by key alone, so a moved cache hits.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from pytest_vmfork.errors import ConfigError, ImageBuildError
from pytest_vmfork.host import private

#: Bump whenever what goes into a tree changes (the squashfs options included).
RECIPE = 1
IMAGE = "modules.sqfs"
MANIFEST = "manifest.json"
#: zstd level 6: 4 s and 91 MiB for Debian's tree, where the default level 15 takes
#: 28 s for 85 MiB and xz 78 s for 74 MiB (measured on two loaded cores). The guest
#: decompresses only the modules it loads.
SQUASHFS_OPTIONS = ("-comp", "zstd", "-Xcompression-level", "6", "-noappend", "-quiet", "-no-progress",
                    "-all-root")
#: Links ``make modules_install`` leaves into the kernel's build tree: not part of a tree.
BUILD_LINKS = ("build", "source")
_digests: dict[tuple[object, ...], str] = {}


@dataclass(frozen=True)
class ModuleTree:
    """A built module tree in the cache; ``image`` is the squashfs every VM attaches."""

    key: str
    dir: Path
    release: str
    names: frozenset[str]  # loadable and built-in module names, "-" written "_"
    manifest: dict[str, Any]

    @property
    def image(self) -> Path:
        return self.dir / IMAGE

    def require(self, wanted: Iterable[str]) -> None:
        """ConfigError naming the first of ``wanted`` this kernel lacks, with a close match."""
        for name in wanted:
            if normalize(name) not in self.names:
                near = difflib.get_close_matches(normalize(name), sorted(self.names), n=1)
                hint = f"did you mean {near[0]!r}?" if near else "check the name with `modinfo NAME` in a fork"
                raise ConfigError(f"Template modules: kernel {self.release} has no module {name!r}; {hint}")


def normalize(name: str) -> str:
    """modprobe treats ``-`` and ``_`` in module names alike."""
    return name.replace("-", "_")


def module_names(moddir: Path) -> frozenset[str]:
    """Every module ``modprobe`` accepts in ``moddir``: the .ko files and the built-in ones."""
    names = {p.name.split(".ko")[0] for p in moddir.rglob("*.ko*")}
    builtin = moddir / "modules.builtin"
    if builtin.exists():
        names |= {line.rsplit("/", 1)[-1].split(".ko")[0] for line in builtin.read_text().split()}
    return frozenset(normalize(n) for n in names)


def tree_digest(moddir: Path) -> str:
    """sha256 over a module tree's paths, modes and contents (symlink targets unfollowed).

    Memoized by every file's (size, mtime, inode): a template's key is computed several
    times per run, and hashing 400 MB each time would cost seconds."""
    entries = []
    for path in sorted(moddir.rglob("*")):
        rel = path.relative_to(moddir).as_posix()
        if rel in BUILD_LINKS:
            continue
        st = path.lstat()
        entries.append((rel, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino))
    memo = (str(moddir), tuple(entries))
    if memo in _digests:
        return _digests[memo]
    h = hashlib.sha256()
    for rel, mode, *_ in entries:
        path = moddir / rel
        h.update(f"{rel}\0{stat.S_IFMT(mode)}\0".encode())
        if stat.S_ISLNK(mode):
            h.update(os.readlink(path).encode())
        elif stat.S_ISREG(mode):
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        h.update(b"\0")
    _digests[memo] = h.hexdigest()
    return _digests[memo]


def key_for(source_digest: str) -> str:
    """The cache key of the tree built from a source with this content digest."""
    doc = {"recipe": RECIPE, "squashfs": list(SQUASHFS_OPTIONS), "source": source_digest}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def load(d: Path, progress: Callable[[str], None] = lambda s: None) -> ModuleTree | None:
    """The complete, trusted tree in cache entry ``d``, or None (missing, partial, foreign)."""
    if not d.exists():
        return None
    try:
        private.verify_cache_entry(d)
        manifest = json.loads((d / MANIFEST).read_text())
        if manifest["key"] != d.name or (d / IMAGE).stat().st_size != manifest["files"][IMAGE]:
            return None
        return ModuleTree(d.name, d, str(manifest["release"]), frozenset(manifest["names"]), manifest)
    except private.PrivateDirError as exc:
        progress(f"vmfork: {exc}; rebuilding it")
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def entry(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "modules" / key


def ensure(moddir: Path, key: str, cache_dir: Path, *, progress: Callable[[str], None] = lambda s: None
           ) -> tuple[ModuleTree, bool]:
    """The tree for ``moddir`` (a ``lib/modules/<release>`` directory) under ``key``:
    cached, or built now, once however many processes ask. Returns (tree, built now)."""
    final = entry(cache_dir, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    if tree := load(final, progress):
        return tree, False
    with filelock.FileLock(str(final.parent / f"{key}.lock")):
        if tree := load(final):
            return tree, False
        for stale in [*final.parent.glob(f".staging-{key}-*"), *final.parent.glob(f".old-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build; we hold the key's lock
        staging = final.parent / f".staging-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            _build(moddir, key, staging, progress)
            private.seal(staging)
            if final.exists():  # untrusted or incomplete: set aside; running VMs keep their open files
                old = final.parent / f".old-{key}-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    tree = load(final)
    if tree is None:
        raise ImageBuildError(f"module tree {final} is incomplete right after its build; delete it and retry")
    return tree, True


def _build(moddir: Path, key: str, out: Path, progress: Callable[[str], None]) -> None:
    start = time.monotonic()
    release = moddir.name
    progress(f"vmfork: building module tree {key[:12]} of kernel {release} (depmod, squashfs)")
    base = out / "work"
    tree = base / "lib" / "modules" / release
    shutil.copytree(moddir, tree, symlinks=True, copy_function=_link_or_copy,
                    ignore=lambda d, names: [n for n in names if Path(d) == moddir and n in BUILD_LINKS])
    for name in ("modules.dep", "modules.dep.bin", "modules.alias", "modules.alias.bin", "modules.symbols",
                 "modules.symbols.bin", "modules.softdep", "modules.devname", "modules.builtin.bin",
                 "modules.builtin.alias.bin"):
        (tree / name).unlink(missing_ok=True)  # depmod writes its own: never edit a linked source file
    _run([_tool("depmod", "kmod"), "-b", base, release], "depmod of the module tree", "apt-get install kmod")
    names = module_names(tree)
    unpacked = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    _run([_tool("mksquashfs", "squashfs-tools"), tree, out / IMAGE, *SQUASHFS_OPTIONS],
         "mksquashfs of the module tree", "apt-get install squashfs-tools")
    shutil.rmtree(base)
    (out / IMAGE).chmod(0o444)  # attached to every VM: guard against accidental writes
    manifest = {
        "key": key, "recipe": RECIPE, "release": release, "names": sorted(names),
        "files": {IMAGE: (out / IMAGE).stat().st_size}, "unpacked_bytes": unpacked,
        "build_seconds": round(time.monotonic() - start, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    progress(f"vmfork: module tree {key[:12]} built in {manifest['build_seconds']} s "
             f"({len(names)} modules, {unpacked >> 20} MiB unpacked, {(out / IMAGE).stat().st_size >> 20} MiB squashfs)")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def _tool(name: str, package: str) -> str:
    from pytest_vmfork.build.rootfs import find_tool

    exe = find_tool(name)
    if exe is None:
        raise ImageBuildError(f"building the kernel module tree needs {name}: apt-get install {package}")
    return exe


def _run(cmd: list[object], what: str, fix: str) -> None:
    try:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, errors="replace")
    except subprocess.CalledProcessError as e:
        tail = " | ".join((e.stderr or e.stdout or "").strip().splitlines()[-6:]) or "(no output)"
        raise ImageBuildError(f"{what} failed (exit {e.returncode}): {tail}; {fix}") from e
