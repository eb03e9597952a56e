"""The context every sweep shares: where to look, the report, the time budget, what
earlier phases learned (the QEMUs found, the runs and bridges live leases name), and
removing a directory. Sweeps nothing itself; the phase modules (``processes``,
``runs``, ``kept``, ``leases``, ``links``, ``partials``) take a :class:`Sweep`."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container

from pytest_vmfork.janitor.report import GcReport
from pytest_vmfork.net import leaseroot

#: A JSON record: None if missing, {} if unreadable (nobody can prove ownership).
#: One reader for every record gc judges (owner.json, handles.json, fork entries).
read_json = leaseroot.read_record


class OutOfTime(Exception):
    """The time budget is used up: the phase stops, the rest is reported as skipped."""


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


@dataclass
class Qemu:
    """A QEMU process of ours found in ``/proc`` (by :func:`pytest_vmfork.janitor.processes.scan`)."""

    pid: int
    start: int
    ppid: int
    name: str
    vm_dir: Path
    orphan: str | None = None  # why its owner is gone; None: alive owner

    @property
    def label(self) -> str:
        return f"pid {self.pid} ({self.name})"


@dataclass
class Sweep:
    """One gc pass: its settings, its report and what its phases found so far."""

    report: GcReport
    run_root: Path
    lease_root: Path
    cache_dir: Path | None
    dry_run: bool
    include_kept: bool
    orphan_links: bool
    link_names: Container[str] | None
    lock_timeout: float
    deadline: float | None
    qemus: list[Qemu] = field(default_factory=list)  # every QEMU of ours under the run root
    live_lease_runs: set[str] = field(default_factory=set)  # runs a live lease names
    lease_bridges: set[str] = field(default_factory=set)  # bridges any lease names
    run_root_trusted: bool = True  # False: nothing read from the run root is acted on

    def check_time(self) -> None:
        """Raise :class:`OutOfTime` once the budget is used up."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OutOfTime

    def rmtree(self, kind: str, path: Path, reason: str) -> bool:
        """Remove ``path`` (only report it in a dry run); False if that failed."""
        if self.dry_run:
            self.report.remove(kind, path, reason)
            return True
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return True  # removed meanwhile (its owner finished)
        except OSError as exc:
            self.report.skip(kind, path, f"{reason}, but removing it failed: {exc.strerror}")
            return False
        self.report.remove(kind, path, reason)
        return True
