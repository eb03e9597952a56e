"""What pytest-vmfork adds to the Debian root: the guest's file layout.

The agent (``/opt/vmfork/agent.py`` and its package ``/opt/vmfork/vmfork_agent/``),
the init files, the host modules the guest shares byte for byte
(``/opt/vmfork/pytest_vmfork/``) and the host venv's exact protobuf and pyroute2
wheels unpacked into ``/opt/vmfork/site``. The guest's ``sys.path`` is
/opt/vmfork and /opt/vmfork/site (guest/inittab), so every name placed there is a
package of pytest-vmfork's own. A template's own files are not here: they go on top
of the cached root per image (image.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock

from pytest_vmfork.build import guestfiles
from pytest_vmfork.errors import ImageBuildError


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
    for rel, data in guest.items():  # the agent's package, beside its entry: /opt/vmfork/vmfork_agent/
        if rel.startswith(guestfiles.AGENT_PACKAGE + "/"):
            files[f"/opt/vmfork/{rel}"] = (data, 0o644)
    for rel, data in shared.items():
        files[f"/opt/vmfork/pytest_vmfork/{rel}"] = (data, 0o644)
    for path in sorted(site.rglob("*")):
        rel = "/opt/vmfork/site/" + path.relative_to(site).as_posix()
        if path.is_symlink():
            files[rel] = (os.readlink(path), 0)
        elif path.is_file() and "__pycache__" not in path.parts:
            files[rel] = (path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
    return files


def install_wheels(versions: Mapping[str, str], wheel_dir: Path, target: Path) -> None:
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
