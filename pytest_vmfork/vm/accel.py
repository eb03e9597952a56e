"""Choosing the accelerator: KVM only where a probe proves a stock kernel boots.

``/dev/kvm`` existing is not proof: some hosts expose a paravirtual KVM that
only boots specially built guest kernels. The probe boots the image's own
Debian kernel under ``-accel kvm`` without a disk and waits for the kernel to
start its init process; the verdict is cached per (kernel, QEMU, host kernel).
A probe that cannot run is a verdict against KVM, never an error; a verdict
that cannot be recorded is a ConfigError naming the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from pytest_vmfork.build import image as image_mod
from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host import cache
from pytest_vmfork.vm.template import Template
from pytest_vmfork.vm.vmm import QEMU_BINARY, qemu_version

PROBE_TIMEOUT_S = 20.0
PROBE_MARKER = b"Run /init as init process"
_QEMU_PREFIX = re.compile(r"qemu-system-\w+: (error: )?")


def probe_kvm(kernel: Path, initrd: Path, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Boot ``kernel`` under KVM until it starts init. Returns (ok, reason)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="vmfork-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            QEMU_BINARY, "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "256",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}", "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 rdinit=/init panic=-1",
        ]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            return False, f"QEMU could not be started: {exc}"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if console.exists() and PROBE_MARKER in console.read_bytes():
                    return True, "a stock kernel booted under KVM"
                time.sleep(0.1)  # a bounded probe of a one-off process, not a readiness wait
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                return False, f"QEMU exited under KVM: {err[-300:] or proc.returncode}"
            return False, f"the kernel did not reach init under KVM within {timeout:.0f}s"
        finally:
            proc.kill()
            proc.wait()


def resolve_accel(setting: str, cache_dir: Path, template: Template, progress: Callable[[str], None],
                  options: image_mod.BuildOptions | None = None, *, verbose: bool = False) -> str:
    """Turn the ``accel`` setting (auto/tcg/kvm) into the accelerator to use.

    The probe runs once per (image, QEMU, host kernel) and its verdict is cached.
    The verdict is reported in one line when it was probed now (or with
    ``verbose``), never QEMU's whole diagnosis: that is in the verdict file.
    """
    if setting == "tcg":
        return "tcg"
    img = image_mod.build_image(template.image_spec(), cache_dir, progress=progress,
                                options=options or image_mod.BuildOptions())
    cache.record_use(img.dir)
    path = probe_cache_path(cache_dir, img.key)
    try:
        verdict = json.loads(path.read_text())
        probed = False
    except (OSError, ValueError):
        ok, reason = probe_kvm(img.kernel, img.initrd)
        verdict = {"ok": ok, "reason": reason}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(verdict))
        except OSError as exc:
            raise ConfigError(
                f"cannot record the KVM probe's verdict in {path}: {exc.strerror}; make the cache "
                "directory writable or choose another (--vmfork-cache-dir / VMFORK_CACHE_DIR)") from exc
        probed = True
    reason = short_reason(str(verdict.get("reason", "")))
    if setting == "kvm" and not verdict.get("ok"):
        raise ConfigError(
            f"--vmfork-accel=kvm, but KVM cannot boot the guest kernel here: {reason} (details: {path}); "
            "use --vmfork-accel=tcg or auto"
        )
    if probed or verbose:
        progress(verdict_line(bool(verdict.get("ok")), reason, path))
    return "kvm" if verdict.get("ok") else "tcg"


def verdict_line(ok: bool, reason: str, path: Path) -> str:
    """``vmfork: accelerator tcg (KVM unusable: <reason>; details: <file>)``."""
    if ok:
        return "vmfork: accelerator kvm"
    return f"vmfork: accelerator tcg (KVM unusable: {reason}; details: {path})"


def probe_cache_path(cache_dir: Path, image_key: str) -> Path:
    """Where the KVM verdict for this image, QEMU and host kernel is kept."""
    key = hashlib.sha256(f"{image_key}|{qemu_version()}|{os.uname().release}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "probes" / f"kvm-{key}.json"


def one_line(text: str, limit: int = 200) -> str:
    """A multi-line diagnosis (QEMU's assertion text) as one short line."""
    flat = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def short_reason(text: str, limit: int = 100) -> str:
    """The first line of a probe's diagnosis, without QEMU's program-name prefixes:
    ``QEMU exited under KVM: failed to set MSR 0x10a to 0x69``."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "no reason recorded")
    return one_line(_QEMU_PREFIX.sub("", first), limit)
