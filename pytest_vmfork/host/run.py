"""Per-run working directories: where live VMs keep their sockets and handles.

One run (a pytest session with all its xdist workers, or one script) owns
``<base>/<run id>/``, where the base is ``$XDG_RUNTIME_DIR/vmfork`` or
``<tmp>/vmfork-<uid>``, a verified private directory (pytest_vmfork.host.private). Every live VM has a directory below it with
its sockets, console log and a ``handles.json`` naming the transient handles
(VMM PID and start time, files), so that another process can clean up after a
run that died. Paths stay short: Unix socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pytest_vmfork.host import confine, private
from pytest_vmfork.host.procid import boot_id, process_start_time

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_qemu_lock = threading.Lock()  # resolving the QEMU user may run useradd


def base_dir() -> Path:
    """The verified private base of every run directory of this uid (created 0700)."""
    return private.private_dir(private.run_base_dir(), "run directory base")


def new_run_id() -> str:
    return secrets.token_hex(4)


@dataclass
class Run:
    """A run's directory; ``worker`` tells xdist workers' VMs apart.

    ``qemu_user`` says who every QEMU of the run (template boots, forks, warm
    pool) runs as when the run is root's (see :mod:`pytest_vmfork.host.confine`):
    None for the unprivileged ``vmfork-qemu`` (created on first use), a user
    name, or ``"root"`` to keep uid 0; unset, ``$VMFORK_QEMU_USER``. A named user
    is checked here, before any VM."""

    run_id: str = field(default_factory=new_run_id)
    worker: str = "m"
    root: Path | None = None
    qemu_user: str | None = field(default_factory=lambda: os.environ.get("VMFORK_QEMU_USER") or None)
    _qemu: confine.QemuUser | None = field(default=None, init=False, repr=False, compare=False)
    _reported: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.qemu_user = confine.check_setting(self.qemu_user)
        confine.check_user(self.qemu_user)
        self.root = base_dir() if self.root is None else private.private_dir(self.root, "run directory base")
        self.dir.mkdir(mode=private.PRIVATE_MODE, exist_ok=True)
        try:  # the first process of the run (the xdist controller) owns it
            private.write_json(self.dir / "owner.json", {
                "pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                "boot_id": boot_id(), "run_id": self.run_id}, exclusive=True)
        except FileExistsError:
            pass

    @property
    def dir(self) -> Path:
        assert self.root is not None
        return self.root / self.run_id[:16]

    def new_vm_dir(self, kind: str) -> tuple[str, Path]:
        """A fresh, unique VM name and its directory."""
        with _counter_lock:
            n = next(_counter)
        name = f"{kind}{self.worker}-{os.getpid() % 100000}-{n}"
        path = self.dir / name
        path.mkdir(mode=private.PRIVATE_MODE)
        return name, path

    def qemu(self, progress: Callable[[str], None] | None = None) -> confine.QemuUser:
        """Who this run's QEMUs run as; resolved (the default user created) on first
        use and reported once through the first ``progress`` given."""
        with _qemu_lock:
            if self._qemu is None:
                self._qemu = confine.resolve(self.qemu_user, progress=progress)
            user, report = self._qemu, progress is not None and not self._reported
            self._reported |= report
        if report and progress is not None:
            progress(user.describe())
        return user

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def write_handles(vm_dir: Path, handles: dict[str, Any]) -> None:
    """Record a VM's transient handles atomically, with the process that owns
    the VM, so another process can clean up after a run or worker that died."""
    me = os.getpid()
    private.write_json(vm_dir / "handles.json", {"owner_pid": me, "owner_start_time": process_start_time(me),
                                         "boot_id": boot_id(), **handles})
