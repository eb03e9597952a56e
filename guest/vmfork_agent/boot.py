"""What the agent finds once at boot: the kernel command line, the virtio-serial
ports by name, and the console it logs to.

The console log is non-blocking (a stalled serial console must never stall the
agent) and stays off the resume path.
"""

from __future__ import annotations

import os
import time

AGENT_VERSION = "2"
START = time.monotonic()

try:  # non-blocking: a stalled serial console must never stall the agent
    _CONSOLE = os.open("/dev/console", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
except OSError:
    _CONSOLE = 2


def log(msg: str) -> None:
    """One line on the guest's console (the host's serial log); dropped if the console is full."""
    try:
        os.write(_CONSOLE, f"vmfork-agent: {msg}\n".encode())
    except OSError:
        pass  # console full or gone: drop the line


def cmdline_params() -> dict[str, str]:
    """``vmfork.key=value`` words from the kernel command line."""
    with open("/proc/cmdline") as f:
        words = f.read().split()
    out = {}
    for w in words:
        if w.startswith("vmfork."):
            key, _, value = w[len("vmfork.") :].partition("=")
            out[key] = value
    return out


def find_port(name: str, timeout: float = 30.0) -> str:
    """The /dev node of the virtio-serial port called ``name`` (no udev here)."""
    deadline = time.monotonic() + timeout
    while True:
        base = "/sys/class/virtio-ports"
        for entry in os.listdir(base) if os.path.isdir(base) else ():
            try:
                with open(f"{base}/{entry}/name") as f:
                    if f.read().strip() == name:
                        return f"/dev/{entry}"
            except OSError:
                continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial port {name} did not appear")
        time.sleep(0.05)  # boot only: the module may still be probing

