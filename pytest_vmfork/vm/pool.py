"""The warm pool: forks started ahead of time, waiting for their per-fork data."""

from __future__ import annotations

import threading
import time

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host.run import Run
from pytest_vmfork.vm.restore import DEFAULT_HANDOFF_TIMEOUT, DEFAULT_READY_TIMEOUT, ForkEngine, Network
from pytest_vmfork.vm.snapshot import Snapshot


class WarmPool:
    """A few forks restored ahead of time and pre-warmed, waiting for a request.

    Under TCG a fresh QEMU translates every guest code path anew, so a fork's
    first resume and first command cost far more than any later one (on the
    lean channel a first exec ~200 ms, a later one ~40 ms: make bench). The
    pool's forks pay that before any request: spawned, device state loaded,
    resumed once with no payloads, one
    command run (:meth:`ForkEngine.prewarm`). A request stops one, patches its
    payloads, entropy, clock and generation in and resumes it (its network
    handoff too), like ``vm.deliver()``. Bounded (``size``), refilled by a
    background thread, closed like any fork (pooled QEMUs carry PR_SET_PDEATHSIG).
    An empty pool means a cold fork, never a wait.

    It pays even when the suite is CPU-bound: a translation the pre-warm does is
    one the test would do, so the pool moves work off the test's path rather
    than adding any (120 tests x 4 commands, ``-n 2``, two cores: 2.12 tests/s
    with the pool, 1.58 without, tests/bench/suite_ab.py).
    """

    def __init__(self, snapshot: Snapshot, run: Run, network: Network, size: int = 1, *,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 handoff_timeout: float = DEFAULT_HANDOFF_TIMEOUT) -> None:
        if not isinstance(size, int) or not 0 <= size <= 8:
            raise ConfigError(f"pool size {size!r}: use 0 to 8 pre-started forks")
        self.snapshot, self.run, self.network, self.size = snapshot, run, network, size
        self.ready_timeout, self.handoff_timeout = ready_timeout, handoff_timeout
        self._ready: list[ForkEngine] = []
        self._filling = bool(size)  # a VM is being restored and pre-warmed (the first: from the start)
        self._cond = threading.Condition()
        self._closed = False
        self.failures = 0
        self.last_error: str | None = None  # why the last fill failed (reported by the plugin)
        self._thread = threading.Thread(target=self._fill, name="vmfork-pool", daemon=True)
        if size:
            self._thread.start()

    def take(self, snapshot: Snapshot, network: Network) -> ForkEngine | None:
        """A pre-warmed fork's engine for this snapshot and network, or None (fork cold).

        When none is ready but one is being pre-warmed, wait for it (at most
        ``ready_timeout``): it started before this request, so it is ready
        sooner than a cold fork would be, and a cold fork beside it would only
        slow both down (each translates the guest's code paths anew). The wait
        is part of the fork's ``restore_to_healthy_ms`` and is reported as
        ``pool_wait_ms``."""
        if snapshot is not self.snapshot or network != self.network or not self.size:
            return None
        t0 = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: self._ready or not self._filling or self._closed,
                                timeout=self.ready_timeout)
            engine = self._ready.pop(0) if self._ready else None
            self._cond.notify_all()  # the filler: room for the next one
        if engine is None:
            return None
        if not engine.alive():
            engine.close()
            return None
        engine.timings["pool_wait_ms"] = round((time.monotonic() - t0) * 1000, 2)
        return engine

    def _fill(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or (len(self._ready) < self.size and self.failures < 3))
                if self._closed:
                    return
                self._filling = True
            name, workdir = self.run.new_vm_dir("p")
            engine = ForkEngine(name, self.snapshot, self.run, workdir)
            try:
                engine.prepare(self.network)
                engine.prewarm(self.ready_timeout, self.handoff_timeout)
            except Exception as exc:
                self.failures += 1  # a broken pool must not spin; forks then start cold
                self.last_error = f"{type(exc).__name__}: {exc}"
                engine.close()
                engine = None
            with self._cond:
                self._filling = False
                if engine is not None:
                    if self._closed:
                        engine.close()
                        return
                    self._ready.append(engine)
                self._cond.notify_all()

    def ready_pids(self) -> list[int]:
        """The QEMU pids of the forks waiting in the pool, oldest first."""
        with self._cond:
            return [e.pid for e in self._ready if e.pid is not None]

    def close(self) -> None:
        """Stop refilling and close every fork still waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(30)
        with self._cond:
            ready, self._ready = self._ready, []
        for engine in ready:
            engine.close()
