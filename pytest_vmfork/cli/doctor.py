"""``vmfork doctor``: can this host run forked VMs, and if not, what to do.

Every check does the real thing where that is cheap (create and delete a
bridge and a TAP, write into a child's memory through /proc/<pid>/mem, run
setpriv) rather than guessing from file modes. Nothing is built: KVM is only
probed against an image that is already cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DOCTOR_BRIDGE = "vmfkdoctor"
DOCTOR_TAP = "vtdoctor"
MIN_DISK = 2 << 30
MIN_MEMORY = 1 << 30


@dataclass(frozen=True)
class Check:
    """One verdict. ``required``: pytest-vmfork cannot work without it (else a
    degraded mode exists, e.g. TCG instead of KVM, user-mode networking)."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True

    @property
    def verdict(self) -> str:
        return "ok" if self.ok else ("FAIL" if self.required else "warn")


def _guard(name: str, required: bool, func: Callable[[], Check]) -> Check:
    try:
        return func()
    except Exception as exc:  # a check that crashes is a failed check, not a crashed doctor
        return Check(name, False, f"the check itself failed: {type(exc).__name__}: {exc}",
                     "report this with the output of `vmfork doctor`", required)


# --- checks -------------------------------------------------------------------


def check_qemu() -> Check:
    from pytest_vmfork.vm.vmm import QEMU_BINARY, qemu_version

    exe = shutil.which(QEMU_BINARY)
    if exe is None:
        return Check("qemu", False, f"{QEMU_BINARY} not found on PATH",
                     "apt-get install qemu-system-x86 (or `make setup`)")
    return Check("qemu", True, f"{qemu_version()} ({exe})")


def _cached_image(cache_dir: Path):  # -> image.Image | None
    from pytest_vmfork.build import image as image_mod
    from pytest_vmfork.vm.template import Template

    with_default = image_mod.cached_image(Template().image_spec(), cache_dir)
    if with_default is not None:
        return with_default
    images = Path(cache_dir) / "images"
    candidates = sorted((p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.stat().st_mtime, reverse=True) if images.is_dir() else []
    for path in candidates:
        img = image_mod.load_cached(path)
        if img is not None:
            return img
    return None


def check_kvm(cache_dir: Path) -> Check:
    from pytest_vmfork.vm.accel import one_line, probe_cache_path, probe_kvm

    name = "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        import grp

        group = ""
        try:
            group = grp.getgrgid(os.stat("/dev/kvm").st_gid).gr_name
        except (OSError, KeyError):
            pass
        user = _username()
        fix = (f"add yourself to the {group} group (sudo usermod -aG {group} {user}, then log in again)"
               if group and group != "root" else "give this user access to /dev/kvm (or run on a host with KVM)")
        return Check(name, False, "/dev/kvm is missing or not accessible to this user; forks run under TCG "
                     "(slower)", fix, required=False)
    img = _cached_image(cache_dir)
    if img is None:
        return Check(name, False,
                     "unknown until an image is built (the probe boots the image's stock kernel)",
                     "run `vmfork build` (or any test run), then `vmfork doctor` again", required=False)
    cache = probe_cache_path(cache_dir, img.key)  # the same verdict cache as accel.resolve_accel
    try:
        verdict = json.loads(cache.read_text())
        ok, reason, how = bool(verdict["ok"]), str(verdict["reason"]), "cached probe"
    except (OSError, ValueError, KeyError, TypeError):
        ok, reason = probe_kvm(img.kernel, img.initrd)
        how = "probe"
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"ok": ok, "reason": reason}))
        except OSError:
            pass
    first = one_line(reason)
    if ok:
        return Check(name, True, f"{first} ({how}, image {img.key[:12]})", required=False)
    return Check(name, False, f"not usable for a stock kernel: {first} ({how}, image {img.key[:12]}); "
                 "forks run under TCG (slower)",
                 "nothing to do for TCG; for KVM give the host a /dev/kvm that boots stock kernels "
                 "(nested virtualisation enabled)", required=False)


def check_tun() -> Check:
    from pytest_vmfork.net.network import TUN_DEVICE

    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check("tun device", False, f"cannot open {TUN_DEVICE}: {exc.strerror}",
                     "modprobe tun, or pass /dev/net/tun into the container; without it forks use "
                     "user-mode networking (--vmfork-network=user)", required=False)
    os.close(fd)
    return Check("tun device", True, f"{TUN_DEVICE} opens read-write", required=False)


def check_net_admin() -> Check:
    """Create and delete a bridge and a TAP on it, exactly as a run does."""
    from filelock import FileLock

    from pytest_vmfork.net import network as nw

    name = "bridge + TAP (CAP_NET_ADMIN)"
    fix = ("run as root or grant CAP_NET_ADMIN (e.g. docker --cap-add NET_ADMIN --device /dev/net/tun); "
           "without it forks use user-mode networking (--vmfork-network=user)")
    if not nw.has_net_admin():
        return Check(name, False, "this process lacks CAP_NET_ADMIN", fix, required=False)
    from pyroute2 import IPRoute

    def attempt() -> str:
        with IPRoute() as ipr:
            if nw.link_exists(DOCTOR_BRIDGE):  # left by a doctor that was killed
                nw.delete_link(DOCTOR_BRIDGE)
            try:
                ipr.link("add", ifname=DOCTOR_BRIDGE, kind="bridge")
            except Exception as exc:
                code = getattr(exc, "code", None)
                return f"creating bridge {DOCTOR_BRIDGE} failed: {os.strerror(code) if code else exc}"
        try:
            fd = nw.open_tap(DOCTOR_TAP, DOCTOR_BRIDGE)
            os.close(fd)  # non-persistent: the TAP goes with the fd
        finally:
            nw.delete_link(DOCTOR_BRIDGE)
        if nw.link_exists(DOCTOR_TAP) or nw.link_exists(DOCTOR_BRIDGE):
            return "the test bridge or TAP outlived its deletion"
        return ""

    # one doctor at a time: the test interfaces have fixed names
    with FileLock(f"/tmp/.vmfork-doctor-{os.getuid()}.lock", timeout=30):
        try:
            problem = nw.off_loop(attempt)
        except Exception as exc:
            problem = str(exc)
    if problem:
        return Check(name, False, problem, fix, required=False)
    return Check(name, True, f"created and deleted bridge {DOCTOR_BRIDGE} and TAP {DOCTOR_TAP}",
                 required=False)


def check_procmem() -> Check:
    """Mailboxes are written into a fork through /proc/<pid>/mem of QEMU, our child."""
    name = "/proc/<pid>/mem write (ptrace)"
    fix = ("allow ptrace of own children: sysctl kernel.yama.ptrace_scope=1 (or 0), and do not run under "
           "a seccomp/AppArmor profile that denies ptrace (docker: --cap-add SYS_PTRACE)")
    child = subprocess.Popen(["sleep", "5"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        try:
            fd = os.open(f"/proc/{child.pid}/mem", os.O_RDWR)
        except OSError as exc:
            return Check(name, False, f"cannot open /proc/{child.pid}/mem for writing: {exc.strerror}", fix)
        try:
            addr = None
            with open(f"/proc/{child.pid}/maps") as maps:
                for line in maps:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].startswith("rw"):
                        addr = int(parts[0].split("-")[0], 16)
                        break
            if addr is None:
                return Check(name, False, "the child has no writable mapping to test with", fix)
            data = os.pread(fd, 8, addr)
            if os.pwrite(fd, data, addr) != len(data):  # writes back what is there: a no-op
                return Check(name, False, "short write into the child's memory", fix)
        except OSError as exc:
            return Check(name, False, f"writing /proc/{child.pid}/mem failed: {exc.strerror}", fix)
        finally:
            os.close(fd)
    finally:
        child.kill()
        child.wait()
    return Check(name, True, "wrote into a child's memory through /proc/<pid>/mem")


def check_setpriv() -> Check:
    name = "setpriv (PDEATHSIG)"
    fix = "apt-get install util-linux (QEMU is started through setpriv so it dies with its test process)"
    exe = shutil.which("setpriv")
    if exe is None:
        return Check(name, False, "setpriv not found on PATH", fix)
    res = subprocess.run([exe, "--pdeathsig", "KILL", "--", "true"], capture_output=True, text=True,
                         timeout=10, check=False)
    if res.returncode != 0:
        return Check(name, False, f"setpriv --pdeathsig failed: {res.stderr.strip()[-200:]}", fix)
    return Check(name, True, f"{exe} --pdeathsig works")


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cache_dir: Path) -> Check:
    where = _existing(cache_dir)
    free = shutil.disk_usage(where).free
    detail = f"{free / (1 << 30):.1f} GiB free at {where} (cache {cache_dir})"
    if free >= MIN_DISK:
        return Check("disk space", True, detail)
    return Check("disk space", False, detail + f"; need {MIN_DISK >> 30} GiB for an image and a snapshot",
                 "free space there or point the cache elsewhere (--vmfork-cache-dir / VMFORK_CACHE_DIR)")


def check_memory() -> Check:
    avail = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    if avail is None:
        return Check("memory", False, "MemAvailable is missing from /proc/meminfo", "check /proc",
                     required=False)
    detail = f"{avail / (1 << 30):.1f} GiB available"
    if avail >= MIN_MEMORY:
        return Check("memory", True, detail)
    return Check("memory", False, detail + f"; need {MIN_MEMORY >> 30} GiB (template + forks)",
                 "stop other memory users, or use a smaller Template(memory_mib=...) and fewer xdist workers")


def check_tool(tool: str, package: str, why: str, required: bool) -> Check:
    from pytest_vmfork.build.rootfs import find_tool

    exe = find_tool(tool)
    if exe is None:
        return Check(tool, False, f"{tool} not found on PATH ({why})", f"apt-get install {package}", required)
    return Check(tool, True, exe, required=required)


def check_kernel(template, cache_dir: Path) -> Check:  # template: template.Template
    """The template's kernel verdict: a user's kernel checked against what a fork needs
    (from its config, without booting it); Debian's with its module tree if it is built."""
    from pytest_vmfork.build import image as image_mod
    from pytest_vmfork.build import kernel

    name = "guest kernel"
    if template.kernel is None:
        img = image_mod.cached_image(template.image_spec(), cache_dir)
        if img is None:
            return Check(name, True, f"Debian linux-image-{template.kernel_flavour} (not built yet; its module tree "
                         "is built once per kernel with the first image)")
        tree = img.modules
        mods = (f"module tree {tree.key[:12]}: {len(tree.names)} modules, {tree.image.stat().st_size >> 20} MiB "
                "squashfs shared by every image of this kernel") if tree else "no module tree"
        return Check(name, True, f"Debian {img.manifest['kernel'].get('release', '?')}; {mods}")
    uk = kernel.inspect_kernel(template.kernel)
    problems = uk.problems(with_modules=template.kernel_modules is not None)
    if problems:
        line, _, fix = problems[0].partition(": set ")
        return Check(name, False, line + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                     ("set " + fix) if fix else problems[0])
    mods = f", modules from {template.kernel_modules}" if template.kernel_modules else ", no module tree"
    return Check(name, True, f"{template.kernel} ({uk.kind}, {uk.release}, config from {uk.config_source}{mods})")


def _username() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def check_build_mode(requested: str = "auto") -> Check:
    """Which mmdebstrap mode builds the guest root for this user, or the fix."""
    from pytest_vmfork.build import rootfs
    from pytest_vmfork.errors import VMForkError

    name = "image build (mmdebstrap)"
    try:
        mode = rootfs.choose_mode(requested)
    except VMForkError as exc:
        return Check(name, False, str(exc).split(";")[0], str(exc).partition(";")[2].strip() or
                     "apt-get install mmdebstrap uidmap fakechroot fakeroot")
    problems = rootfs.extract_problems(os.geteuid() == 0)
    if problems:
        return Check(name, False, f"{mode.name} mode, but writing the root filesystem needs: "
                     + "; ".join(problems), "; ".join(p.split(": ", 1)[-1] for p in problems))
    detail = f"{mode.name} mode as {_username()} ({mode.reason})"
    if mode.name == "fakechroot":
        hint = rootfs.unshare_problems()
        return Check(name, True, detail + "; unshare mode would be sturdier: " + "; ".join(hint))
    return Check(name, True, detail)


def check_apt_sources(setting: str | None = None) -> Check:
    """The guest's Debian sources resolve (the host's bookworm entries or vmfork_apt_sources)."""
    from pytest_vmfork.build import aptsources
    from pytest_vmfork.errors import ConfigError

    name = "apt sources"
    try:
        apt = aptsources.resolve(setting)
    except ConfigError as exc:
        return Check(name, False, str(exc).split(";")[0],
                     f"set vmfork_apt_sources, e.g. {aptsources.EXAMPLE!r}")
    return Check(name, True, f"{len(apt.sources)} source(s) from {apt.origin}: {apt.sources[0]}"
                 + (f" (+{len(apt.sources) - 1})" if len(apt.sources) > 1 else ""))


def diagnose(cache_dir: Path | str | None = None, *, apt_sources: str | None = None,
             build_mode: str = "auto", template=None) -> list[Check]:  # template: Template | None
    """Every check, in order; nothing is built or left behind. ``template`` (default: the
    stock one) is the one whose kernel gets a verdict."""
    from pytest_vmfork.config import default_cache_dir
    from pytest_vmfork.vm.template import Template

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [
        _guard("qemu", True, check_qemu),
        _guard("kvm", False, lambda: check_kvm(cache)),
        _guard("tun device", False, check_tun),
        _guard("bridge + TAP (CAP_NET_ADMIN)", False, check_net_admin),
        _guard("/proc/<pid>/mem write (ptrace)", True, check_procmem),
        _guard("setpriv (PDEATHSIG)", True, check_setpriv),
        _guard("disk space", True, lambda: check_disk(cache)),
        _guard("memory", True, check_memory),
        _guard("image build (mmdebstrap)", True, lambda: check_build_mode(build_mode)),
        _guard("apt sources", True, lambda: check_apt_sources(apt_sources)),
        _guard("lz4", False, lambda: check_tool(
            "lz4", "lz4", "unpacks lz4-compressed kernels for a fast boot; without it the bzImage boots",
            False)),
        _guard("mksquashfs", True, lambda: check_tool(
            "mksquashfs", "squashfs-tools", "packs the guest kernel's module tree", True)),
        _guard("depmod", True, lambda: check_tool("depmod", "kmod", "indexes the guest kernel's module tree", True)),
        _guard("guest kernel", True, lambda: check_kernel(template or Template(), cache)),
    ]


def failed(checks: list[Check]) -> list[Check]:
    """The required checks that failed."""
    return [c for c in checks if c.required and not c.ok]


def format(checks: list[Check]) -> str:  # the name the brief and the CLI use
    """A verdict line per check, the fix under each problem, and an overall verdict."""
    width = max(len(c.name) for c in checks) if checks else 0
    lines = []
    for c in checks:
        lines.append(f"{c.verdict:<4}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    bad = failed(checks)
    warn = [c for c in checks if not c.ok and not c.required]
    if bad:
        names = ", ".join(c.name for c in bad)
        lines.append(f"verdict: NOT ready: {len(bad)} required check(s) failed ({names})")
    else:
        lines.append("verdict: ready" + (f" ({len(warn)} warning(s): {', '.join(c.name for c in warn)})"
                                          if warn else ""))
    return "\n".join(lines)


__all__ = ["Check", "diagnose", "failed", "format"]
