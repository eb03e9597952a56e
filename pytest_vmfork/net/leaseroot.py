"""Where leases live, and the lock and record helpers every lease file uses.

Bridge and TAP names and the IPv4 address space are kernel-global, so every
pytest-vmfork run on a host must agree on who owns what, and a run that died
(SIGKILL, OOM, power loss of the CI job) must not block the host forever.
Both problems are solved with small JSON lease files guarded by file locks,
all under one lease root (:func:`default_lease_root`):

``<lease_root>/host/``
    Host-wide: one lease per run subnet and the tombstones of leases being
    cleaned up, written under ``host/.lock`` (:mod:`pytest_vmfork.net.leases`).

``<lease_root>/runs/<run_id>/``
    Per-run. ``fork-<index>.json`` per live fork: its address, MAC and TAP
    name, shared by the xdist workers of the run and by nothing else, written
    under ``runs/<run_id>/.lock`` (:mod:`pytest_vmfork.net.forkleases`).

Records are written atomically without following symlinks
(:func:`pytest_vmfork.host.private.write_json`) and read with :func:`read_record`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_vmfork.errors import ConfigError, VMForkError
from pytest_vmfork.host import private

RUN_LEASE_ROOT = Path("/run/vmfork")
LOCK_TIMEOUT = 30.0

_RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch


def default_lease_root() -> Path:
    """``/run/vmfork`` when this uid can use it (tmpfs: cleared by a reboot, shared
    by every run of root on the host), else ``leases/`` in this uid's private run
    directory base. Either way a verified private directory (pytest_vmfork.host.private).

    The fallback is only shared by one user's runs; bridges of other users are
    still avoided because their gateway addresses show up as host routes.
    """
    run = RUN_LEASE_ROOT
    try:
        run.mkdir(mode=private.PRIVATE_MODE, exist_ok=True)
        if os.access(run, os.W_OK | os.X_OK) and os.lstat(run).st_uid == os.geteuid():
            return private.private_dir(run, "lease root", create=False)
    except OSError:
        pass
    return private.private_dir(private.private_dir(private.run_base_dir(), "run directory base") / "leases",
                               "lease root")


def resolve_lease_root(lease_root: Path | str | None) -> Path:
    """``lease_root`` (None: :func:`default_lease_root`), verified private
    (PrivateDirError names the fix otherwise): resolve it once and pass the
    result on, so every lease of a run lands in the same checked place."""
    if lease_root is None:
        return default_lease_root()
    return private.private_dir(Path(lease_root), "lease root")


def ensure_lease_dir(path: Path) -> Path:
    """``path`` created (mode 0700) if missing; a VMForkError saying what to do otherwise."""
    try:
        path.mkdir(mode=private.PRIVATE_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise VMForkError(
            f"cannot create lease directory {path}: {exc.strerror}; make it writable "
            "or point the lease root elsewhere"
        ) from exc
    return path


def host_lease_dir(lease_root: Path | str | None = None) -> Path:
    """Where the host-wide subnet leases live (not created here)."""
    return resolve_lease_root(lease_root) / "host"


def validate_run_id(run_id: object) -> str:
    """Run ids name directories: keep them path-safe."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "not starting with . _ or -"
        )
    return run_id


def run_lease_dir(run_id: str, lease_root: Path | str | None = None) -> Path:
    """Where the per-run leases of ``run_id`` live (not created here)."""
    return resolve_lease_root(lease_root) / "runs" / validate_run_id(run_id)


def remove_run(run_id: str, lease_root: Path | str | None = None) -> None:
    """Remove a run's lease directory; missing is fine."""
    shutil.rmtree(run_lease_dir(run_id, lease_root), ignore_errors=True)


class LeaseLock:
    """A FileLock whose timeout is a VMForkError that says what to do.

    Use it as a context manager; ``what`` names the lock in that error
    ("host lease", "run <id>")."""

    def __init__(self, path: Path, timeout: float, what: str) -> None:
        self._lock = FileLock(str(path), timeout=timeout)
        self._path = path
        self._timeout = timeout
        self._what = what

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except Timeout:
            raise VMForkError(
                f"timed out after {self._timeout:g} s waiting for the {self._what} lock "
                f"{self._path}: another pytest-vmfork process holds it; find it with "
                f"`fuser {self._path}` and wait for it or stop it"
            ) from None
        except OSError as exc:
            raise VMForkError(f"cannot open lock file {self._path}: {exc.strerror}") from exc

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record: None if missing, {} if unreadable or not an object
    (nobody can prove ownership of such a file, so it counts as stale)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
