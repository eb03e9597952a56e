"""QEMU's QMP monitor of one VM: its commands, descriptors handed over, migrations.

Apart from the process (pytest_vmfork/vm/vmm.py), the way qemu.qmp keeps the
transport apart from the protocol: this module speaks QMP over our end of a
socketpair QEMU inherited, through qemu.qmp's asyncio client on the background
loop (pytest_vmfork/vm/qmploop.py); it neither spawns nor kills QEMU.

Every failure is a VMForkError: a command QEMU refused or a monitor that went
away is a RestoreError naming the command, one that did not answer in time a
QemuTimeout (the caller's bound); qemu.qmp's own errors are chained, never raised.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError

from pytest_vmfork.errors import RestoreError
from pytest_vmfork.vm import qmploop


class Monitor:
    """The QMP connection of the QEMU named ``name`` (created before QEMU runs;
    :meth:`accept` reads its greeting)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.qmp = QMPClient(name)

    async def accept(self, sock: socket.socket, timeout: float, gone: Callable[[], bool]) -> bool:
        """Read QEMU's greeting on ``sock``: True once the monitor is up, False if
        QEMU exited first (``gone()``) or sent none within ``timeout`` seconds."""
        accept = asyncio.ensure_future(self.qmp.connect(sock))
        deadline = time.monotonic() + timeout
        while not accept.done():
            # Wake on the greeting at once; look at the process only to fail fast
            # when QEMU exits on a bad command line.
            await asyncio.wait({accept}, timeout=0.05)
            if not accept.done() and (gone() or time.monotonic() > deadline):
                accept.cancel()
                break
        return accept.done() and not accept.cancelled() and accept.exception() is None

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command on the loop; RestoreError naming it if QEMU refused it or the monitor closed."""
        try:
            return await self.qmp.execute(command, args)
        except (QMPError, OSError) as exc:
            raise RestoreError(f"QEMU for {self.name}: QMP {command} failed: "
                               f"{str(exc) or type(exc).__name__}") from exc

    def cmd(self, command: str, timeout: float = 30.0, **args: Any) -> Any:
        """Execute one QMP command and return its result."""
        return qmploop.run(self.execute(command, args or None), timeout, what=f"QMP {command} on {self.name}")

    async def _pass_fd(self, fd: int, name: str) -> None:
        try:
            self.qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise RestoreError(f"QEMU for {self.name}: passing a descriptor over QMP failed: "
                               f"{str(exc) or type(exc).__name__}") from exc
        await self.execute("getfd", {"fdname": name})

    def send_fd(self, fd: int, name: str, timeout: float = 10.0) -> None:
        """Hand QEMU a copy of ``fd`` (SCM_RIGHTS over QMP) under ``name``, for ``fd:<name>`` URIs."""
        qmploop.run(self._pass_fd(fd, name), timeout, what=f"QMP getfd on {self.name}")

    def _open_state(self, path: Path, flags: int) -> int:
        try:
            return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RestoreError(f"QEMU for {self.name}: cannot open the device state file {path}: "
                               f"{exc.strerror}") from exc

    def migrate_from_file(self, path: Path, timeout: float = 30.0) -> None:
        """Start loading the device state from ``path`` (an incoming migration).

        The file is opened here and handed to QEMU over QMP (``getfd``): QEMU's
        sandbox denies spawning the ``exec:cat`` helper, and QEMU needs no access
        to the path."""
        fd = self._open_state(path, os.O_RDONLY)
        try:
            self.send_fd(fd, "state", timeout)
        finally:
            os.close(fd)
        self.cmd("migrate-incoming", timeout=timeout, uri="fd:state")

    def migrate_to_file(self, path: Path, timeout: float = 30.0) -> None:
        """Start saving the device state to ``path`` (created, never through a
        symlink or over an existing file), passed to QEMU as a descriptor."""
        fd = self._open_state(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            self.send_fd(fd, "state", timeout)
        finally:
            os.close(fd)
        self.cmd("migrate", timeout=timeout, uri="fd:state")

    def wait_migration(self, timeout: float) -> None:
        """Wait until an incoming or outgoing migration completes (MIGRATION events);
        RestoreError if it failed, QemuTimeout if it did not end within ``timeout``."""

        async def wait() -> None:
            while True:
                status = (await self.execute("query-migrate")).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    info = await self.execute("query-migrate")
                    raise RestoreError(f"migration of {self.name} {status}: {info.get('error-desc', info)}")
                try:
                    event = await asyncio.wait_for(self.qmp.events.get(), 0.5)
                except TimeoutError:
                    continue  # re-query: an event may have fired before we listened
                if event["event"] != "MIGRATION":
                    continue

        qmploop.run(wait(), timeout, what=f"the migration of {self.name}")

    def run_state(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``inmigrate``, ...)."""
        return str(self.cmd("query-status")["status"])

    async def disconnect(self) -> None:
        """Close the connection (bounded; never raises: the VM is going away)."""
        try:
            await asyncio.wait_for(self.qmp.disconnect(), 2)
        except Exception:
            pass
