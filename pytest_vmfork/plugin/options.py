"""The plugin's options: every setting is a ``--vmfork-*`` flag and a ``vmfork_*`` ini key.

One table (:data:`OPTIONS`: name, help, parser, default, environment variable) from
which the plugin adds its flags and ini keys and resolves them, once, into the frozen
:class:`~pytest_vmfork.config.Settings`. Precedence: command line, then environment
variable (where one exists), then ini file, then default. Values are resolved with
``is None`` so an explicit falsy value still wins. The parsers check a value where it
is given (a bad one is a ConfigError naming it), using the library's own parsers for
apt sources, sizes, build modes, subnet pools and the QEMU user.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pytest_vmfork.build.aptsources import parse_setting as parse_apt_sources
from pytest_vmfork.build.rootfs import MODES
from pytest_vmfork.config import ACCELS, NETWORKS, Settings, default_cache_dir
from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host.cache import parse_size
from pytest_vmfork.host.confine import check_setting
from pytest_vmfork.net.subnets import parse_pool


def _bool(name: str) -> Callable[[Any], bool]:
    def parse(value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{name}={value!r}: use true or false")

    return parse


def _accel(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in ACCELS:
        raise ConfigError(f"vmfork accel {value!r} is not one of {', '.join(ACCELS)}")
    return text


def _network(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in NETWORKS:
        raise ConfigError(f"vmfork network {value!r} is not one of {', '.join(NETWORKS)}")
    return text


def _apt_sources(value: Any) -> str:
    parse_apt_sources(str(value))  # ConfigError naming the bad item
    return str(value)


def _cache_max_size(value: Any) -> int:
    return parse_size(value, "vmfork cache max size")  # ConfigError naming the accepted forms


def _build_mode(value: Any) -> str:
    text = str(value).strip().lower()
    if text not in MODES:
        raise ConfigError(f"vmfork build mode {value!r} is not one of {', '.join(MODES)}")
    return text


def _pool(value: Any) -> str:
    parse_pool(str(value))  # ConfigError naming the problem
    return str(value)


def _qemu_user(value: Any) -> str | None:
    return check_setting(str(value).strip())  # ConfigError naming the problem


def _count(name: str, upper: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            number = int(str(value))
        except ValueError:
            raise ConfigError(f"{name}={value!r}: use a whole number from 0 to {upper}") from None
        if not 0 <= number <= upper:
            raise ConfigError(f"{name}={value!r}: use a whole number from 0 to {upper}")
        return number

    return parse


def _seconds(name: str, upper: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r}: use a number of seconds") from None
        if not 0 < number <= upper:
            raise ConfigError(f"{name}={value!r}: use seconds greater than 0 and at most {upper:g}")
        return number

    return parse


@dataclass(frozen=True)
class Option:
    name: str  # ini key; the flag is --<name with - for _>
    help: str
    parse: Callable[[Any], Any]
    default: Callable[[], Any]
    env: str | None = None
    flag_type: str = "value"  # or "bool"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("vmfork_accel", "accelerator: auto (KVM only if a probe boots the guest kernel under it), tcg or kvm",
           _accel, lambda: "auto", env="VMFORK_ACCEL"),
    Option("vmfork_cache_dir", "where images and snapshots are cached (default ~/.cache/pytest-vmfork)",
           lambda v: Path(str(v)).expanduser(), default_cache_dir, env="VMFORK_CACHE_DIR"),
    Option("vmfork_cache_max_size", "cap on the cache's size on disk (e.g. 10G), enforced when a run ends by "
           "removing the least recently used entries no live run uses (default: no cap; see vmfork cache prune)",
           _cache_max_size, lambda: None, env="VMFORK_CACHE_MAX_SIZE"),
    Option("vmfork_rebuild", "boot the template again and retake the snapshot (once per run); "
           "the image is rebuilt only if its inputs changed", _bool("vmfork_rebuild"), lambda: False,
           flag_type="bool"),
    Option("vmfork_keep_failed", "save a failed test's VM as a kept snapshot (vmfork exec NAME -- argv) and keep its files",
           _bool("vmfork_keep_failed"), lambda: False, flag_type="bool"),
    Option("vmfork_ready_timeout", "seconds a fork may take to signal readiness",
           _seconds("vmfork_ready_timeout", 600), lambda: 30.0),
    Option("vmfork_network", "fork networking: auto (tap with CAP_NET_ADMIN, else user), tap (a TAP per fork "
           "on a per-run bridge), user (QEMU user-mode, unprivileged) or none",
           _network, lambda: "auto", env="VMFORK_NETWORK"),
    Option("vmfork_subnet_pool", "IPv4 private networks the per-run /24 subnets are leased from "
           "(comma-separated; subnets overlapping host routes are skipped)", _pool, lambda: "10.213.0.0/16"),
    Option("vmfork_lease_dir", "root of the host-wide and per-run lease directories "
           "(default /run/vmfork, else <tmp>/vmfork-<uid>/leases)",
           lambda v: Path(str(v)).expanduser(), lambda: None),
    Option("vmfork_pool_size", "forks kept ready ahead per process and snapshot (restored, resumed once and "
           "pre-warmed with one command), so a fork request only patches its payloads in and resumes; 0 disables",
           _count("vmfork_pool_size", 8),
           lambda: 1),
    Option("vmfork_apt_sources", "Debian sources the guest image is built from: mirror URLs, 'deb ...' lines or "
           "sources files, separated by ';' or newlines (default: the host's bookworm entries in /etc/apt)",
           _apt_sources, lambda: None, env="VMFORK_APT_SOURCES"),
    Option("vmfork_build_mode", "how mmdebstrap builds the guest root: auto (root as root, else unshare with "
           "/etc/subuid entries, else fakechroot), root, unshare or fakechroot",
           _build_mode, lambda: "auto", env="VMFORK_BUILD_MODE"),
    Option("vmfork_handoff_timeout", "seconds to wait for the guest's network ack before the control channel fallback",
           _seconds("vmfork_handoff_timeout", 60), lambda: 2.0),
    Option("vmfork_qemu_user", "the unprivileged user QEMU runs as when pytest runs as root (default vmfork-qemu, "
           "created when needed; an existing user's name; root keeps uid 0). Ignored when not root",
           _qemu_user, lambda: None, env="VMFORK_QEMU_USER"),
)


def resolve_settings(getoption: Callable[[str], Any], getini: Callable[[str], Any]) -> Settings:
    """Every option's value from the command line, environment or ini file, parsed, as Settings."""
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = getoption(opt.name)
        if raw is None and opt.env:
            raw = os.environ.get(opt.env) or None
        if raw is None:
            ini = getini(opt.name)
            raw = ini if ini not in (None, "", []) else None
        values[opt.name.removeprefix("vmfork_")] = opt.default() if raw is None else opt.parse(raw)
    return Settings(**values)
