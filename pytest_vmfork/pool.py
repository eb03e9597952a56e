"""The warm pool: forks started ahead of time, waiting for their per-fork data."""

from __future__ import annotations

import threading

from .errors import ConfigError
from .fork import VM, Network
from .run import Run
from .snapshot import Snapshot


class WarmPool:
    """A few forks started ahead of time, device state loaded, vCPUs stopped.

    Spawning QEMU, the QMP handshake and loading the device state take ~60-70 ms
    under TCG and are the same for every fork of a snapshot, so they are done
    before the fork request; only the per-fork data (mailboxes) and the resume
    remain. Bounded (``size``), refilled by a background thread, and closed like
    any VM: pooled QEMUs carry PR_SET_PDEATHSIG too.
    """

    def __init__(self, snapshot: Snapshot, run: Run, network: Network, size: int = 1) -> None:
        if not isinstance(size, int) or not 0 <= size <= 8:
            raise ConfigError(f"pool size {size!r}: use 0 to 8 pre-started forks")
        self.snapshot, self.run, self.network, self.size = snapshot, run, network, size
        self._ready: list[VM] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self.failures = 0
        self._thread = threading.Thread(target=self._fill, name="vmfork-pool", daemon=True)
        if size:
            self._thread.start()

    def take(self, snapshot: Snapshot, network: Network) -> VM | None:
        """A prepared VM for this snapshot and network, or None (fork cold)."""
        if snapshot is not self.snapshot or network is not self.network:
            return None
        with self._lock:
            vm = self._ready.pop(0) if self._ready else None
        self._wake.set()
        if vm is not None and not vm.alive():
            vm.close()
            return None
        return vm

    def _fill(self) -> None:
        while not self._closed:
            with self._lock:
                missing = self.size - len(self._ready)
            if missing <= 0 or self.failures >= 3:
                self._wake.wait()
                self._wake.clear()
                continue
            name, workdir = self.run.new_vm_dir("p")
            vm = VM(name, self.snapshot, self.run, workdir)
            try:
                vm._prepare(self.network)
            except Exception:
                self.failures += 1  # a broken pool must not spin; forks then start cold
                vm.close()
                continue
            with self._lock:
                if self._closed:
                    vm.close()
                    return
                self._ready.append(vm)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(30)
        with self._lock:
            ready, self._ready = self._ready, []
        for vm in ready:
            vm.close()
