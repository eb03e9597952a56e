"""A fork's private copy of guest RAM, written through ``/proc/<pid>/mem``.

A fork's QEMU maps the snapshot's memory file privately (copy-on-write): the
host patches per-fork data (the mailboxes) into that copy while the vCPUs are
stopped, and the file every fork shares never changes. Apart from the QEMU
process (vm/vmm.py) because it reaches the guest through the kernel, not
through any of QEMU's channels. A QEMU that is gone, or whose memory cannot be
reached, is a RestoreError.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_vmfork.errors import RestoreError


class ProcMem:
    """Write into a running QEMU's private mapping of the RAM file.

    Writing through /proc/<pid>/mem changes only that process's copy-on-write
    pages: the snapshot's memory file, shared by every fork, never changes.
    A QEMU that is gone (or whose memory cannot be reached) is a RestoreError.
    """

    def __init__(self, pid: int, mem_path: Path) -> None:
        self.pid = pid
        self.base = self._mapping_start(pid, mem_path)

    @staticmethod
    def _mapping_start(pid: int, mem_path: Path) -> int:
        target = os.path.realpath(mem_path)  # maps shows the resolved path
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].strip() == target and parts[2] == "00000000":
                        return int(parts[0].split("-")[0], 16)
        except OSError as exc:
            raise RestoreError(f"QEMU pid {pid}: cannot read its memory map: {exc.strerror} "
                               "(QEMU exited?)") from exc
        raise RestoreError(f"QEMU pid {pid} has no mapping of {target}")

    def _open(self, flags: int) -> int:
        try:
            return os.open(f"/proc/{self.pid}/mem", flags)
        except OSError as exc:
            raise RestoreError(f"QEMU pid {self.pid}: cannot open its memory: {exc.strerror} "
                               "(QEMU exited?)") from exc

    def write(self, writes: list[tuple[int, bytes]]) -> None:
        fd = self._open(os.O_RDWR)
        try:
            for off, data in writes:
                if os.pwrite(fd, data, self.base + off) != len(data):
                    raise RestoreError(f"short write into QEMU pid {self.pid} memory")
        except OSError as exc:
            raise RestoreError(f"writing into QEMU pid {self.pid} memory failed: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def read(self, off: int, size: int) -> bytes:
        fd = self._open(os.O_RDONLY)
        try:
            return os.pread(fd, size, self.base + off)
        except OSError as exc:
            raise RestoreError(f"reading QEMU pid {self.pid} memory failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
