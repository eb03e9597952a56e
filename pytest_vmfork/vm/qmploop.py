"""One background asyncio loop for the whole process.

qemu.qmp is asyncio-native. Instead of a second, synchronous copy of the QMP
logic we run its async client on a single long-lived daemon thread and give
the rest of the library a blocking ``run(coro, timeout)``. That thread is also
where VMM processes are spawned: PR_SET_PDEATHSIG fires when the *thread* that
forked the child exits, so children must come from a thread that lives as long
as the process.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, TypeVar

from pytest_vmfork.errors import QemuTimeout

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None:
            new = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(new)
                new.call_soon(ready.set)
                new.run_forever()

            threading.Thread(target=main, name="vmfork-loop", daemon=True).start()
            ready.wait()
            _loop = new
        return _loop


def run(coro: Awaitable[T], timeout: float | None = None, what: str = "a call to QEMU") -> T:
    """Run ``coro`` on the background loop and wait for its result.

    Raises QemuTimeout (a TimeoutError) naming ``what`` after ``timeout`` seconds
    (the coroutine is cancelled); whatever else ``coro`` raises passes through.
    """

    async def bounded() -> T:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await coro
        except TimeoutError as exc:
            if scope.expired():
                raise QemuTimeout(f"{what} did not finish within {timeout:g}s") from exc
            raise

    fut = asyncio.run_coroutine_threadsafe(bounded(), loop())
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise
