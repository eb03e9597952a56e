"""Where the guest's Debian packages come from.

By default the host's own apt configuration: its entries for the guest's release
(bookworm, -updates, -security, -backports), in either sources format, plus the few
``Acquire::`` options that decide whether a mirror is reachable (proxies, Valid-Until
checks of a frozen mirror). That is what reaches the mirror on the host, and nothing
else of the host's apt setup (hooks, third-party repositories) leaks into the build.

A host that has no such entries (Ubuntu, Fedora, a container without Debian sources)
names them instead with ``--vmfork-apt-sources`` / ``vmfork_apt_sources`` /
``$VMFORK_APT_SOURCES``: mirror URLs, one-line ``deb ...`` entries or sources files,
separated by newlines or ``;``. Each is handed to mmdebstrap as a mirror argument.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_vmfork.errors import ConfigError

#: The Debian release every guest is built from.
GUEST_SUITE = "bookworm"
GUEST_SUITES = frozenset({GUEST_SUITE, f"{GUEST_SUITE}-updates", f"{GUEST_SUITE}-security",
                          f"{GUEST_SUITE}-backports"})
#: Host apt options carried into the guest build: only those that decide reachability.
CARRIED_OPTIONS = re.compile(
    r"^Acquire::(https?::Proxy|ftp::Proxy|Check-Valid-Until|Check-Date|Retries|ForceIPv4|ForceIPv6)\b")
EXAMPLE = f"deb http://deb.debian.org/debian {GUEST_SUITE} main"


@dataclass(frozen=True)
class AptConfig:
    """Mirror arguments and apt options for mmdebstrap, and where they came from."""

    sources: tuple[str, ...]
    options: tuple[str, ...] = ()
    origin: str = ""


def parse_one_line(text: str) -> list[str]:
    """One-line ``deb [opts] URI SUITE COMPONENT...`` entries of a sources.list, normalised."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"^deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)((\s+\S+)*)$", line)
        if m:
            opts = f"{m[1].strip()} " if m[1] else ""
            entries.append(f"deb {opts}{m[2]} {m[3]}{' ' + ' '.join(m[4].split()) if m[4] else ''}")
    return entries


def parse_deb822(text: str) -> list[str]:
    """``.sources`` (deb822) paragraphs as one-line entries; disabled and key-inline ones skipped."""
    entries = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in para.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:  # continuation line
                fields[key] += " " + raw.strip()
                continue
            name, sep, value = raw.partition(":")
            if sep:
                key = name.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        signed = fields.get("signed-by", "")
        if "BEGIN PGP" in signed:
            continue  # an inline key cannot be passed as a one-line option
        opts = f"[signed-by={signed}] " if signed else ""
        comps = " ".join(fields.get("components", "").split())
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                entries.append(f"deb {opts}{uri} {suite}{' ' + comps if comps else ''}")
    return entries


def entry_suite(entry: str) -> str:
    """The suite of a one-line entry."""
    words = re.sub(r"\[[^\]]*\]", " ", entry).split()
    return words[2] if len(words) > 2 else ""


def host_entries(etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """The host's entries for the guest's release, in file order."""
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    entries: list[str] = []
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            entries += parse_deb822(text)
        elif path.suffix == ".list" or path.name == "sources.list":
            entries += parse_one_line(text)
    return [e for e in dict.fromkeys(entries) if entry_suite(e) in GUEST_SUITES]


def host_options() -> list[str]:
    """The host's reachability options from ``apt-config dump`` (none without apt)."""
    exe = shutil.which("apt-config")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "dump"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.rstrip(";").strip() for line in out.splitlines() if CARRIED_OPTIONS.match(line)]


def parse_setting(value: str) -> tuple[str, ...]:
    """Validate a ``vmfork_apt_sources`` value into mirror arguments; ConfigError names the bad item."""
    items = [item.strip() for item in re.split(r"[\n;]", value) if item.strip()]
    if not items:
        raise ConfigError(f"vmfork_apt_sources is empty; give a mirror or an entry such as {EXAMPLE!r}")
    for item in items:
        if re.match(r"^(deb|deb-src)\s+\S+", item) or re.match(r"^[a-z][a-z0-9+.-]*://\S+$", item):
            continue
        if Path(item).expanduser().is_file():
            continue
        raise ConfigError(
            f"vmfork_apt_sources item {item!r} is neither a mirror URL, a 'deb ...' line nor an existing "
            f"sources file; e.g. {EXAMPLE!r}"
        )
    return tuple(str(Path(i).expanduser()) if Path(i).expanduser().is_file() else i for i in items)


def resolve(setting: str | None = None) -> AptConfig:
    """The guest's apt configuration: ``setting`` if given, else the host's.

    Raises ConfigError (before anything is built) when neither names a source.
    """
    options = tuple(host_options())
    if setting:
        return AptConfig(parse_setting(setting), options, "vmfork_apt_sources")
    entries = host_entries()
    if not entries:
        raise ConfigError(
            f"the host's apt configuration (/etc/apt) has no {GUEST_SUITE} entries to build the Debian guest "
            f"from; name them with --vmfork-apt-sources (or the vmfork_apt_sources ini key, or "
            f"$VMFORK_APT_SOURCES), e.g. {EXAMPLE!r}"
        )
    return AptConfig(tuple(entries), options, "host /etc/apt")
