"""Netlink calls (pyroute2) made safe to run from any thread of ours.

pyroute2's synchronous API runs its own asyncio loop, so it cannot be called from
a thread that is running one (our QEMU/QMP loop, an async test). Shared by
network.py (bridges, TAPs), subnets.py (the host's routes) and janitor/links.py (stale links),
which import this module and not each other's internals.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def off_loop(func: Callable[[], T]) -> T:
    """Run ``func`` (pyroute2 sync calls) where no asyncio loop is running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return func()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = func()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="vmfork-netlink")
    worker.start()
    worker.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def iproute() -> Any:
    """A pyroute2 IPRoute (imported only when a netlink call is made)."""
    from pyroute2 import IPRoute

    return IPRoute()


def netlink_code(exc: BaseException) -> int | None:
    """The errno of a pyroute2 NetlinkError, None for any other exception."""
    return getattr(exc, "code", None) if type(exc).__name__ == "NetlinkError" else None
