"""Unit tests for the pure parts of the image build: pytest_vmfork.build.imagespec (spec, key,
cache entry) and pytest_vmfork.build.overlay (the guest's file layout); no network, no apt, no QEMU."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from pytest_vmfork.build import guestfiles, imagespec, overlay, rootfs
from pytest_vmfork.build.image import ImageSpec, compute_key

WHEELS = {"protobuf": "2.0", "pyroute2": "0.1"}


@pytest.fixture
def src() -> dict[str, bytes]:
    """Packaged sources that shape the image, as guestfiles.key_sources() returns them."""
    return {
        "guest/rc.sh": b"#!/bin/sh\necho rc\n",
        "guest/inittab": b"::sysinit:/etc/vmfork/rc.sh\n",
        "guest/agent.py": b"print('agent')\n",
        "pytest_vmfork/mailbox.py": b"MAILBOX = 1\n",
        "pytest_vmfork/proto/agent_pb2.py": b"X = 1\n",
    }


def key(src: dict[str, bytes], spec: ImageSpec | None = None, wheels: dict[str, str] = WHEELS) -> str:
    return compute_key(spec or ImageSpec(), src, wheels)


# --- key ---------------------------------------------------------------------------------

def test_key_is_stable_hex(src: dict[str, bytes]) -> None:
    assert key(src) == key(src)
    assert len(key(src)) == 64 and int(key(src), 16) >= 0


@pytest.mark.parametrize("path", ["guest/rc.sh", "guest/agent.py", "pytest_vmfork/mailbox.py",
                                  "pytest_vmfork/proto/agent_pb2.py"])
def test_key_changes_when_a_guest_source_changes(src: dict[str, bytes], path: str) -> None:
    before = key(src)
    src[path] += b"# changed\n"
    assert key(src) != before


def test_key_changes_when_a_guest_file_is_added(src: dict[str, bytes]) -> None:
    before = key(src)
    assert key({**src, "guest/extra.conf": b"x\n"}) != before
    assert key({**src, "pytest_vmfork/proto/more_pb2.py": b"Y = 2\n"}) != before


def test_key_sources_come_from_the_installed_package_and_hold_only_guest_files() -> None:
    sources = guestfiles.key_sources()
    assert {f"guest/{n}" for n in guestfiles.REQUIRED} <= set(sources)
    assert {f"pytest_vmfork/{m}" for m in guestfiles.SHARED_MODULES} <= set(sources)
    assert all(k.startswith("guest/") or k[len("pytest_vmfork/"):] in guestfiles.SHARED_MODULES for k in sources)
    assert not [k for k in sources if k.endswith(".pyc") or "__pycache__" in k]
    from importlib import resources
    assert sources["guest/agent.py"] == resources.files("pytest_vmfork.guest").joinpath("agent.py").read_bytes()
    # The agent's modules shape the key too: a change in any of them rebuilds the image.
    assert sources["guest/vmfork_agent/resume.py"] == \
        resources.files("pytest_vmfork.guest").joinpath("vmfork_agent", "resume.py").read_bytes()


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
    assert key(src, wheels={**WHEELS, "protobuf": "2.1"}) != base
    monkeypatch.setattr(imagespec, "RECIPE_VERSION", imagespec.RECIPE_VERSION + 1)
    assert key(src) != base


def test_key_depends_on_the_base_package_set(src: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    before = key(src)
    monkeypatch.setattr(rootfs, "BASE_PACKAGES", (*rootfs.BASE_PACKAGES, "strace"))
    assert key(src) != before


def test_spec_key_uses_the_real_sources() -> None:
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


# --- cache completeness ----------------------------------------------------------------

def test_load_requires_manifest_and_sizes(tmp_path: Path) -> None:
    import json
    d = tmp_path / ("a" * 64)
    d.mkdir()
    assert imagespec.load_cached(d) is None
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (d / name).write_bytes(b"x" * 3)
    manifest = {"key": d.name, "files": {"vmlinuz": 3, "initrd.img": 3, "rootfs.img": 3}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    img = imagespec.load_cached(d)
    assert img is not None and img.kernel == d / "vmlinuz" and img.rootfs == d / "rootfs.img"
    (d / "vmlinux").write_bytes(b"elf")
    (d / "manifest.json").write_text(json.dumps({**manifest, "files": {**manifest["files"], "vmlinux": 3}}))
    assert imagespec.load_cached(d).kernel == d / "vmlinux"
    (d / "rootfs.img").write_bytes(b"x")  # truncated
    assert imagespec.load_cached(d) is None
    (d / "rootfs.img").write_bytes(b"xxx")
    (d / "manifest.json").write_text(json.dumps({"key": d.name, "files": {}}))
    assert imagespec.load_cached(d) is None  # lists none of the image files
    (d / "manifest.json").write_text("{not json")
    assert imagespec.load_cached(d) is None


# --- the overlay the builder adds to the Debian root ----------------------------------------

def test_overlay_tarball_is_root_owned_and_keeps_modes_and_symlinks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "google").mkdir(parents=True)
    (site / "google/__init__.py").write_text("x = 1\n")
    (site / "google/__pycache__").mkdir()
    (site / "google/__pycache__/x.pyc").write_bytes(b"\0")
    files = overlay.guest_overlay(site)
    files.update({"/usr/local/bin/hello": (b"#!/bin/sh\necho hi\n", 0o755), "/etc/app.conf": (b"a=1\n", 0o644)})
    out = tmp_path / "overlay.tar"
    rootfs.write_overlay(files, out)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar}
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members["./usr/local/bin/hello"].mode == 0o755 and members["./etc/app.conf"].mode == 0o644
    assert members["./usr/sbin/init"].issym() and members["./usr/sbin/init"].linkname == "/bin/busybox"
    assert "./opt/vmfork/site/google/__init__.py" in members
    assert not [n for n in members if "__pycache__" in n]
    # No directory entries: /bin, /sbin and /lib are symlinks into /usr in the Debian root.
    assert not [m for m in members.values() if m.isdir()]
    assert members["./opt/vmfork/agent.py"].size == len(guestfiles.guest_files()["agent.py"])
    # The agent's package sits beside its entry, where the guest's sys.path (/opt/vmfork) finds it.
    agent_modules = {n for n in guestfiles.guest_files() if n.startswith("vmfork_agent/") and n.endswith(".py")}
    assert {"vmfork_agent/__init__.py", "vmfork_agent/server.py", "vmfork_agent/resume.py"} <= agent_modules
    assert {f"./opt/vmfork/{n}" for n in agent_modules} <= set(members)
