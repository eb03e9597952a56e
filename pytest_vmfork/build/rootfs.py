"""The guest root: a real Debian system built by mmdebstrap, then an ext4 image of it.

mmdebstrap installs Debian bookworm, variant minbase plus the agent's needs and the
template's packages, with dpkg and every maintainer script: system users, directories
and alternatives exist as on any Debian machine. It runs as whoever runs the tests:

- ``root`` mode as root;
- ``unshare`` mode for a user with subordinate ids (/etc/subuid, /etc/subgid) and
  ``newuidmap``: a user namespace where that user is root;
- ``fakechroot`` mode otherwise (fakechroot + fakeroot).

Its output is a tarball with the real ownership. The ext4 image is written from it by
``mke2fs -d``; a non-root user unpacks the tarball and runs mke2fs in one ``fakeroot``
session, so the image keeps the tarball's owners (www-data, redis, ...).
"""

from __future__ import annotations

import io
import os
import pwd
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_vmfork.build.aptsources import GUEST_SUITE, AptConfig
from pytest_vmfork.errors import ConfigError, ImageBuildError

#: What every guest gets on top of minbase (which already has coreutils, findutils,
#: grep, sed, tar, util-linux, gzip, hostname): the agent's interpreter, the tools
#: people expect, busybox for init and the initramfs, libstdc++ for the protobuf wheel (upb).
BASE_PACKAGES = ("python3", "iproute2", "procps", "busybox-static", "libstdc++6", "kmod")
#: Trees no test needs; kept out by dpkg itself (documentation, translations).
PATH_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                 "/usr/share/lintian/*", "/usr/share/bug/*")
PATH_INCLUDES = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")
MODES = ("auto", "root", "unshare", "fakechroot")
BUILD_TIMEOUT_S = 1800.0
_MiB = 1 << 20

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildMode:
    """How mmdebstrap runs for this user, and why that mode."""

    name: str
    reason: str


def subid_count(path: Path, user: str, uid: int) -> int:
    """How many subordinate ids ``path`` (/etc/subuid or /etc/subgid) grants this user."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)) and parts[2].isdigit():
            total += int(parts[2])
    return total


def _user() -> tuple[str, int]:
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name, uid
    except KeyError:
        return str(uid), uid


def unshare_problems(etc: Path = Path("/etc")) -> list[str]:
    """Why unshare mode cannot work for this user (empty when it can), each with its fix."""
    name, uid = _user()
    problems = []
    for kind in ("subuid", "subgid"):
        if subid_count(etc / kind, name, uid) < 65536:
            problems.append(f"{etc / kind} grants {name} fewer than 65536 ids: add the line "
                            f"'{name}:100000:65536' (sudo usermod --add-subuids 100000-165535 "
                            f"--add-subgids 100000-165535 {name})")
    for tool in ("newuidmap", "newgidmap"):
        if find_tool(tool) is None:
            problems.append(f"{tool} is missing: apt-get install uidmap")
    clone = Path("/proc/sys/kernel/unprivileged_userns_clone")
    if clone.exists() and clone.read_text().strip() == "0":
        problems.append("unprivileged user namespaces are disabled: sysctl kernel.unprivileged_userns_clone=1")
    try:
        if int(Path("/proc/sys/user/max_user_namespaces").read_text()) == 0:
            problems.append("user namespaces are disabled: sysctl user.max_user_namespaces=15000")
    except (OSError, ValueError):
        pass
    return problems


def fakechroot_problems() -> list[str]:
    return [f"{tool} is missing: apt-get install {tool}" for tool in ("fakechroot", "fakeroot")
            if shutil.which(tool) is None]


def choose_mode(requested: str = "auto") -> BuildMode:
    """The mmdebstrap mode for this user; ImageBuildError with the fix when none works."""
    if requested not in MODES:
        raise ConfigError(f"vmfork build mode {requested!r} is not one of {', '.join(MODES)}")
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed; it builds the Debian guest root: "
                              "apt-get install mmdebstrap")
    is_root = os.geteuid() == 0
    if requested == "root" or (requested == "auto" and is_root):
        if not is_root:
            raise ImageBuildError("vmfork build mode 'root' needs root; use auto, unshare or fakechroot")
        return BuildMode("root", "running as root")
    if requested in ("auto", "unshare"):
        problems = unshare_problems()
        if not problems:
            return BuildMode("unshare", "subordinate ids in /etc/subuid and /etc/subgid")
        if requested == "unshare":
            raise ImageBuildError("vmfork build mode 'unshare' cannot work: " + "; ".join(problems))
    fc = fakechroot_problems()
    if not fc:
        return BuildMode("fakechroot", "no subordinate ids for this user; fakechroot + fakeroot")
    if requested == "fakechroot":
        raise ImageBuildError("vmfork build mode 'fakechroot' cannot work: " + "; ".join(fc))
    raise ImageBuildError(
        f"cannot build the guest image as uid {os.getuid()}: unshare mode needs "
        f"{'; '.join(unshare_problems())}; or install the fallback: {'; '.join(fc)}"
    )


def extract_problems(is_root: bool) -> list[str]:
    """What turning the tarball into ext4 needs for this user."""
    problems = []
    if find_tool("mke2fs") is None:
        problems.append("mke2fs is missing: apt-get install e2fsprogs")
    if not is_root and shutil.which("fakeroot") is None:
        problems.append("fakeroot is missing (keeps file owners as a non-root user): apt-get install fakeroot")
    return problems


def find_tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories, which an ordinary user's PATH lacks
    on Debian (mke2fs lives in /usr/sbin)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def _tail(text: str, lines: int = 8) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def unknown_packages(text: str) -> list[str]:
    """The package names apt said it cannot find, from its output: the error names them."""
    return sorted(set(re.findall(r"Unable to locate package (\S+)", text))
                  | set(re.findall(r"Package '?([^' ]+)'? has no installation candidate", text)))


def mmdebstrap_argv(*, packages: Sequence[str], mode: BuildMode, apt: AptConfig, overlay: Path,
                    kernel_hook: Path, kernel_flavour: str, kernel_out: Path, out_tar: Path) -> list[str]:
    """The mmdebstrap command line (pure; unit tested)."""
    hooks = [
        f"tar-in {overlay} /",
        # The agent's modules and wheels are compiled by the guest's own python now, so
        # no guest ever compiles under TCG (Debian's postinsts compiled the rest).
        'chroot "$1" /usr/bin/python3 -m compileall -q /opt/vmfork',
        f"upload {kernel_hook} /tmp/vmfork-fetch-kernel.sh",
        f'chroot "$1" /bin/sh /tmp/vmfork-fetch-kernel.sh {kernel_flavour}',
        f"copy-out /tmp/vmfork-kernel/kernel.deb {kernel_out}",
        f"copy-out /tmp/vmfork-kernel/info {kernel_out}",
        'rm -rf "$1"/tmp/vmfork-kernel "$1"/tmp/vmfork-fetch-kernel.sh',
    ]
    argv = ["mmdebstrap", "--variant=minbase", f"--mode={mode.name}", "--format=tar",
            f"--include={','.join(dict.fromkeys([*BASE_PACKAGES, *packages]))}"]
    argv += [f"--aptopt={opt}" for opt in apt.options]
    argv += [f"--dpkgopt=path-exclude={p}" for p in PATH_EXCLUDES]
    argv += [f"--dpkgopt=path-include={p}" for p in PATH_INCLUDES]
    argv += [f"--customize-hook={h}" for h in hooks]
    argv = [*argv, GUEST_SUITE, str(out_tar), *apt.sources]
    if mode.name == "root":
        # Root mode mounts /proc, /sys and /dev into its chroot. In a mount namespace of
        # its own those mounts vanish with it, even if it is SIGKILLed mid-build (no
        # stale mounts left in the cache's staging directory), and never show on the host.
        argv = ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child", "--", *argv]
    return argv


def build_tarball(*, packages: Sequence[str], mode: BuildMode, apt: AptConfig, overlay: Path,
                  kernel_hook: Path, kernel_flavour: str, work: Path) -> tuple[Path, Path]:
    """Run mmdebstrap; return (root tarball, directory with kernel.deb and info)."""
    out_tar, kernel_out = work / "root.tar", work / "kernel"
    kernel_out.mkdir(parents=True, exist_ok=True)
    argv = mmdebstrap_argv(packages=packages, mode=mode, apt=apt, overlay=overlay, kernel_hook=kernel_hook,
                           kernel_flavour=kernel_flavour, kernel_out=kernel_out, out_tar=out_tar)
    # mmdebstrap's own temporary root lives in the system temp dir: in unshare mode the
    # namespace's root (a subordinate uid) must reach it, and the cache is private (0700).
    env = {**os.environ, "LC_ALL": "C.UTF-8", "TMPDIR": tempfile.gettempdir()}
    try:
        res = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=env, cwd=work,
                             timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"mmdebstrap did not finish within {BUILD_TIMEOUT_S:.0f}s; check the apt "
                              f"sources ({apt.origin}) are reachable") from exc
    if res.returncode != 0:
        output = res.stderr + res.stdout
        if unknown := unknown_packages(output):
            raise ImageBuildError(
                f"Debian has no package {', '.join(repr(u) for u in unknown)} in {GUEST_SUITE} "
                f"(sources: {apt.origin}); fix the name in Template(packages=...) "
                "(apt-cache policy NAME shows what exists)")
        raise ImageBuildError(
            f"mmdebstrap ({mode.name} mode, sources from {apt.origin}) failed (exit {res.returncode}): "
            f"{_tail(output)}; if a download failed, check the apt sources (--vmfork-apt-sources); "
            "`vmfork doctor` checks the rest")
    if not out_tar.is_file() or not (kernel_out / "kernel.deb").is_file():
        raise ImageBuildError(f"mmdebstrap succeeded but left no {out_tar} or kernel package; "
                              f"its output: {_tail(res.stderr)}")
    return out_tar, kernel_out


def write_overlay(files: Mapping[str, tuple[bytes | str, int]], out: Path) -> None:
    """A tarball of guest files owned by root: path -> (content, mode); str content is a symlink.

    Only files and symlinks are listed: their parent directories are created as needed
    by tar, and existing ones (``/bin`` is a symlink to ``usr/bin``) are never replaced.
    """
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo("." + path)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0 if isinstance(content, str) else 1
            if isinstance(content, str):
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, content, 0o777
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))


def tar_stats(tar_path: Path) -> tuple[int, int, dict[str, str]]:
    """(bytes in 4 KiB blocks, number of entries, installed package versions) of a root tarball."""
    used, count, versions = 0, 0, {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            count += 1
            used += -(-member.size // 4096) * 4096 + (4096 if member.isdir() else 0)
            if member.name in ("./var/lib/dpkg/status", "var/lib/dpkg/status"):
                f = tar.extractfile(member)
                text = f.read().decode(errors="replace") if f else ""
                for stanza in text.split("\n\n"):
                    fields = dict(re.findall(r"^([\w-]+): (.*)$", stanza, re.MULTILINE))
                    if "Package" in fields and "installed" in fields.get("Status", ""):
                        versions[fields["Package"]] = fields.get("Version", "")
    return used, count, versions


def tarball_to_ext4(tar_paths: Sequence[Path], root_dir: Path, image: Path, *, size: int, inodes: int,
                    uuid: str, label: str = "vmfork-root") -> None:
    """Unpack ``tar_paths`` in order into ``root_dir`` and write ``image`` from it, owners kept.

    As root both steps run directly; otherwise in one fakeroot session, whose faked
    ownership mke2fs reads back through stat(). (mke2fs 1.47.1 reads a tarball
    itself; Debian 12 has 1.47.0.)
    """
    root_dir.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(size)
    script = ('root=$1 label=$2 uuid=$3 inodes=$4 image=$5 mke2fs=$6; shift 6; '
              'for t in "$@"; do tar --numeric-owner -xpf "$t" -C "$root" --exclude=./dev/* || exit 1; done && '
              '"$mke2fs" -q -F -t ext4 -d "$root" -L "$label" -U "$uuid" -b 4096 -m 0 -N "$inodes" '
              '-E root_owner=0:0,hash_seed="$uuid" -O ^has_journal "$image"')
    mke2fs = find_tool("mke2fs") or "mke2fs"
    argv = ["sh", "-c", script, "sh", str(root_dir), label, uuid, str(inodes), str(image), mke2fs,
            *map(str, tar_paths)]
    if os.geteuid() != 0:
        argv = ["fakeroot", "--", *argv]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=600,
                             stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} is not installed: apt-get install "
                              f"{'fakeroot' if argv[0] == 'fakeroot' else 'e2fsprogs'}") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError("unpacking the root or mke2fs took longer than 600 s") from exc
    if res.returncode != 0:
        raise ImageBuildError(f"writing the ext4 root from {[t.name for t in tar_paths]} failed (exit {res.returncode}): "
                              f"{_tail(res.stderr + res.stdout)}; apt-get install e2fsprogs fakeroot")
