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
from typing import Any, Awaitable, Callable, TypeVar

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


def run(coro: Awaitable[T], timeout: float | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result.

    Raises ``TimeoutError`` after ``timeout`` seconds (the coroutine is cancelled).
    """

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    fut = asyncio.run_coroutine_threadsafe(bounded(), loop())
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


def call(fn: Callable[..., T], *args: Any) -> T:
    """Call a plain function on the loop thread (see module docstring)."""

    async def wrapper() -> T:
        return fn(*args)

    return run(wrapper())
