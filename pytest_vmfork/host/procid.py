"""Process identity: who owns a lease, a run directory or a QEMU, and whether it is gone.

A PID alone does not name a process: PIDs are reused, and records in a lease
root that is not tmpfs outlive a reboot. Every record pytest-vmfork writes for
an owner therefore holds the PID, its start time (field 22 of
``/proc/<pid>/stat``, clock ticks since boot) and the boot id. Leases, run
directories and the janitor all judge "is the owner gone?" here, one way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from pytest_vmfork.errors import VMForkError

# A record written at t is not "reused" by a process that started within this
# slack after t: /proc start times are rounded to clock ticks, mtimes to the fs.
REUSE_SLACK_S = 2.0


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` that identity needs."""

    state: str  # "R", "S", "Z", ...
    ppid: int
    start: int  # clock ticks since boot


def proc_stat(pid: object) -> ProcStat | None:
    """``/proc/<pid>/stat`` of ``pid``, None if there is no such process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        # comm (field 2) may hold spaces and parentheses: split at the last ')'
        rest = text[text.rindex(")") + 2 :].split()
        return ProcStat(rest[0], int(rest[1]), int(rest[19]))  # fields 3, 4 and 22
    except (OSError, ValueError, IndexError):
        return None


def process_start_time(pid: int) -> int:
    """Field 22 of /proc/<pid>/stat: with the PID, a process identity that
    survives PID reuse."""
    stat = proc_stat(pid)
    if stat is None:
        raise VMForkError(f"process {pid} does not exist; cannot record it as an owner")
    return stat.start


_BOOT_ID: str | None = None


def boot_id() -> str:
    """Identifies this boot: records in a non-tmpfs root survive reboots,
    where PIDs and start times start over."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            _BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


_BTIME: float | None = None


def start_epoch(ticks: int) -> float:
    """A /proc start time (ticks since boot) as seconds since the epoch."""
    global _BTIME
    if _BTIME is None:
        _BTIME = 0.0
        with contextlib.suppress(OSError, ValueError):
            for line in Path("/proc/stat").read_text().splitlines():
                if line.startswith("btime "):
                    _BTIME = float(line.split()[1])
    return _BTIME + ticks / os.sysconf("SC_CLK_TCK")


def owner_gone(pid: object, start_time: object, boot: object = None) -> str | None:
    """Why the owner (pid, start_time[, boot id]) is gone, or None if it is alive.

    Gone means: the PID does not exist, is a zombie (exited, not yet reaped:
    it will never release anything), was reused by another process (start
    time differs), or the record was written during another boot.
    """
    if boot and boot_id() and boot != boot_id():
        return f"pid {pid} belongs to an earlier boot"
    if not isinstance(pid, int) or not isinstance(start_time, int):
        return f"owner {pid!r} is not recorded properly"
    stat = proc_stat(pid)
    if stat is None:
        return f"pid {pid} does not exist"
    if stat.state == "Z":
        return f"pid {pid} is a zombie"
    if stat.start != start_time:
        return f"pid {pid} was reused (start time {stat.start} != {start_time})"
    return None


def is_stale(pid: object, start_time: object, boot: object = None) -> bool:
    """True when :func:`owner_gone` has a reason."""
    return owner_gone(pid, start_time, boot) is not None


def record_gone(pid: object, start_time: object, boot: object, written: float | None) -> str | None:
    """Like :func:`owner_gone`, also for records written before start times
    were recorded: then a live PID counts as the owner unless the process
    started after the record was written (a reused PID)."""
    if isinstance(pid, int) and not isinstance(pid, bool) and start_time is None:
        st = proc_stat(pid)
        if st is None:
            return f"pid {pid} does not exist"
        if st.state == "Z":
            return f"pid {pid} is a zombie"
        if written is not None and start_epoch(st.start) > written + REUSE_SLACK_S:
            return f"pid {pid} was reused (started after the record was written)"
        return None  # cannot prove it gone: treat as alive
    return owner_gone(pid, start_time, boot)
