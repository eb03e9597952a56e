"""What a guest image is and where it is cached: the spec, its key, the built
:class:`Image` and its cache entry (``cache_dir/images/<key>/`` with manifest.json).

The key covers exactly what shapes the image (see :func:`compute_key`), so
``apt-get update`` alone never forces a rebuild; the manifest's paths are relative to
the entry, so a cache copied elsewhere still hits. Apart from the build steps
(image.py, debianroot.py) because a cache hit needs only this: no build tool, no apt.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_vmfork.build import aptsources, guestfiles, kernel, modtree, rootfs
from pytest_vmfork.errors import ImageBuildError
from pytest_vmfork.host import private

#: Bump whenever the build (image, debianroot, overlay) changes what it puts into an image
#: (their own bytes are deliberately not hashed, so comment edits do not force rebuilds).
RECIPE_VERSION = 5  # 5: the kernel's module tree (modtree) attached to every image

#: Guest Python distributions, pinned to the host venv's versions (no grpcio: the
#: agent's channel is plain framed protobuf, docs/protocol.md).
GUEST_DISTRIBUTIONS = ("protobuf", "pyroute2")

IMAGE_FILES = {"kernel": "vmlinuz", "initrd": "initrd.img", "rootfs": "rootfs.img"}
PVH_KERNEL = "vmlinux"  # uncompressed ELF kernel, built when it can be extracted (see kernel.extract_vmlinux)
KERNEL_CONFIG = "config"  # the kernel's .config (Debian's config-<release>), beside vmlinuz
MANIFEST = "manifest.json"

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


def remove_tree(path: Path) -> None:
    """Remove a build tree; a non-root build's unpacked root may hold read-only directories."""
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        subprocess.run(["chmod", "-R", "u+rwX", str(path)], capture_output=True, check=False)
        shutil.rmtree(path, ignore_errors=True)

