"""Settings: the frozen values every layer reads (cache directory, accelerator, network, timeouts...).

The bottom of the package: it imports nothing of ours but errors. The pytest plugin
resolves each setting from its ``--vmfork-*`` flag, ``VMFORK_*`` variable and
``vmfork_*`` ini key into a :class:`Settings` (pytest_vmfork/plugin/options.py, where
the options table and the value parsers live); a script builds one directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ACCELS = ("auto", "tcg", "kvm")
NETWORKS = ("auto", "tap", "user", "none")


def default_cache_dir() -> Path:
    """``$VMFORK_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-vmfork``, else ``~/.cache/pytest-vmfork``."""
    env = os.environ.get("VMFORK_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-vmfork"


@dataclass(frozen=True)
class Settings:
    """Every setting's resolved value; the defaults are a script's (the plugin resolves each one)."""

    accel: str = "auto"
    cache_dir: Path = Path(".")
    cache_max_size: int | None = None  # bytes
    rebuild: bool = False
    keep_failed: bool = False
    ready_timeout: float = 30.0
    network: str = "auto"
    subnet_pool: str = "10.213.0.0/16"
    lease_dir: Path | None = None
    handoff_timeout: float = 2.0
    pool_size: int = 1
    apt_sources: str | None = None
    build_mode: str = "auto"
    qemu_user: str | None = None
