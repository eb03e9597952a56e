"""Template: the recipe for the VM every fork starts from.

A Template is pure data. Its fields split into what shapes the *image* (kernel,
packages, files) and what shapes the *snapshot* (memory, vCPUs, mailboxes,
warm-up); each key hashes exactly those, so changing a warm-up command retakes
the snapshot without rebuilding the image, and a field that shapes neither
(timeouts) rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.build.image import KERNEL_CMDLINE, ImageSpec
from pytest_vmfork.build.kernel import find_module_tree, inspect_kernel_header
from pytest_vmfork.errors import ConfigError

FileContent = Union[bytes, str, Path]
Command = Union[str, Sequence[str]]

#: x86 Linux keeps at most this many bytes of its command line, NUL included
#: (COMMAND_LINE_SIZE; the bzImage header's cmdline_size is one less). The
#: agent learns the template's mailbox names from that line, so they must fit.
KERNEL_COMMAND_LINE_SIZE = 2048
MAILBOXES_PARAM = "vmfork.mailboxes="

#: Bumped whenever the boot or snapshot procedure changes what a snapshot holds.
SNAPSHOT_RECIPE = "3"  # 3: manifest paths relative to the entry, QEMU machine type + CPU recorded


@dataclass(frozen=True)
class Template:
    """What to boot once and snapshot.

    ``files`` maps guest paths to content (bytes or str) or to a host Path to copy.
    ``warmup`` commands run in the guest, in order, after the agent is healthy
    and before the snapshot; a string runs under ``/bin/sh -c``. Each must exit 0.
    ``mailboxes`` names the user mailboxes forks can receive payloads in.
    ``guest_acked_mailboxes`` (a subset) are acknowledged by a guest program
    running ``vmfork-ack NAME`` after it applied the payload, not by the agent
    on delivery.

    Every module of the guest's kernel is available in every fork (``modprobe``,
    on-demand loading). ``modules`` are loaded before the warm-up commands, so
    they are loaded in the snapshot and forks pay nothing for them; a name the
    kernel lacks is a ConfigError before any boot.
    ``kernel`` boots a kernel of your own (``arch/x86/boot/bzImage``) instead of
    Debian's, with ``kernel_modules`` its ``make modules_install`` tree
    (``INSTALL_MOD_PATH`` or its ``lib/modules/<release>``); both are hashed into
    the image key, so a rebuilt kernel retakes the snapshot and nothing else.
    """

    memory_mib: int = 256
    vcpus: int = 1
    kernel_flavour: str = "amd64"
    packages: Sequence[str] = ()
    files: Mapping[str, FileContent] = field(default_factory=dict)
    warmup: Sequence[Command] = ()
    mailboxes: Sequence[str] = ()
    guest_acked_mailboxes: Sequence[str] = ()
    modules: Sequence[str] = ()
    kernel: Path | None = None
    kernel_modules: Path | None = None
    boot_timeout: float = 600.0
    warmup_timeout: float = 600.0

    def __post_init__(self) -> None:
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.memory_mib, int) or not 128 <= self.memory_mib <= 16384:
            raise ConfigError(f"Template memory_mib={self.memory_mib!r}: use an integer from 128 to 16384")
        if not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 16:
            raise ConfigError(f"Template vcpus={self.vcpus!r}: use an integer from 1 to 16")
        if self.kernel_flavour not in ("amd64", "cloud-amd64"):
            raise ConfigError(
                f"Template kernel_flavour={self.kernel_flavour!r}: use 'amd64' (has VMGenID) or 'cloud-amd64'"
            )
        if isinstance(self.packages, str):
            raise ConfigError("Template packages must be a list of Debian package names, not one string")
        fix("packages", tuple(sorted(set(self.packages))))
        for pkg in self.packages:
            if not isinstance(pkg, str) or not pkg or pkg.startswith("-") or " " in pkg:
                raise ConfigError(f"Template packages: {pkg!r} is not a Debian package name")
        files: dict[str, bytes] = {}
        for path, content in dict(self.files).items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigError(f"Template files: guest path {path!r} must be absolute")
            if isinstance(content, Path):
                try:
                    content = content.read_bytes()
                except OSError as exc:
                    raise ConfigError(f"Template files: cannot read {content} for {path}: {exc}") from exc
            elif isinstance(content, str):
                content = content.encode()
            elif not isinstance(content, bytes):
                raise ConfigError(f"Template files: content for {path} must be bytes, str or Path")
            files[path] = content
        fix("files", dict(sorted(files.items())))
        commands: list[tuple[str, ...]] = []
        for cmd in self.warmup:
            argv = ("/bin/sh", "-c", cmd) if isinstance(cmd, str) else tuple(cmd)
            if not argv or not all(isinstance(a, str) for a in argv):
                raise ConfigError(f"Template warmup: {cmd!r} must be a shell string or a non-empty argv list")
            commands.append(argv)
        fix("warmup", tuple(commands))
        if isinstance(self.mailboxes, str):
            raise ConfigError("Template mailboxes must be a list of names, not one string")
        names = tuple(self.mailboxes)
        for name in names:
            try:
                mbx.validate_name(name)
            except mbx.MailboxError as exc:
                raise ConfigError(f"Template mailboxes: {exc}") from exc
        if len(set(names)) != len(names):
            raise ConfigError(f"Template mailboxes: duplicate names in {list(names)}")
        if len(names) > mbx.MAX_TEMPLATE_MAILBOXES:
            raise ConfigError(
                f"Template mailboxes: {len(names)} declared, at most {mbx.MAX_TEMPLATE_MAILBOXES} per template"
            )
        fix("mailboxes", names)
        line = len(self.kernel_cmdline().encode())
        if line >= KERNEL_COMMAND_LINE_SIZE:
            room = KERNEL_COMMAND_LINE_SIZE - 1 - len(KERNEL_CMDLINE) - len(" " + MAILBOXES_PARAM)
            raise ConfigError(
                f"Template mailboxes: the {len(names)} names take {len(','.join(names))} characters "
                f"({MAILBOXES_PARAM}a,b,...) on the guest kernel command line, which has room for {room}; "
                "use shorter names or fewer mailboxes"
            )
        if isinstance(self.guest_acked_mailboxes, str):
            raise ConfigError("Template guest_acked_mailboxes must be a list of names, not one string")
        acked = tuple(self.guest_acked_mailboxes)
        unknown = [n for n in acked if n not in names]
        if unknown:
            raise ConfigError(f"Template guest_acked_mailboxes: {unknown} are not in mailboxes {list(names)}")
        fix("guest_acked_mailboxes", acked)
        if isinstance(self.modules, str):
            raise ConfigError("Template modules must be a list of kernel module names, not one string")
        modules = tuple(dict.fromkeys(self.modules))
        for mod in modules:
            if not isinstance(mod, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", mod):
                raise ConfigError(f"Template modules: {mod!r} is not a kernel module name (letters, digits, _ and -)")
        fix("modules", modules)
        self._check_kernel(fix)
        for name in ("boot_timeout", "warmup_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 7200:
                raise ConfigError(f"Template {name}={value!r}: use seconds between 0 and 7200")
        try:
            self.image_spec()
        except ValueError as exc:
            raise ConfigError(f"Template: {exc}") from exc

    def _check_kernel(self, fix: Callable[[str, object], None]) -> None:
        """kernel= and kernel_modules=: readable, a kernel at all, and the default flavour."""
        if self.kernel is None:
            if self.kernel_modules is not None:
                raise ConfigError("Template kernel_modules= needs kernel=: Debian's kernel always brings its "
                                  "own module tree")
            return
        if self.kernel_flavour != "amd64":
            raise ConfigError(f"Template kernel= and kernel_flavour={self.kernel_flavour!r} exclude each other: "
                              "kernel_flavour picks one of Debian's kernels; drop it to boot your own")
        path = Path(self.kernel).expanduser().absolute()
        if not path.is_file():
            raise ConfigError(f"Template kernel={str(self.kernel)!r} is not a file; pass your build's "
                              "arch/x86/boot/bzImage")
        inspect_kernel_header(path)
        fix("kernel", path)
        if self.kernel_modules is not None:
            tree = Path(self.kernel_modules).expanduser().absolute()
            if not tree.is_dir():
                raise ConfigError(f"Template kernel_modules={str(self.kernel_modules)!r} is not a directory; pass "
                                  "the INSTALL_MOD_PATH of `make modules_install` (or its lib/modules/<release>)")
            find_module_tree(tree)
            fix("kernel_modules", tree)

    def kernel_cmdline(self) -> str:
        """The template's guest kernel command line: the image's, plus the mailbox
        names the agent registers (one mlock'ed page each) when it starts."""
        if not self.mailboxes:
            return KERNEL_CMDLINE
        return f"{KERNEL_CMDLINE} {MAILBOXES_PARAM}{','.join(self.mailboxes)}"

    def describe(self) -> str:
        """A short human description for the run summary: what tells templates apart."""
        parts = [f"{self.memory_mib} MiB", f"{self.vcpus} vCPU"]
        if self.kernel_flavour != "amd64":
            parts.append(self.kernel_flavour)
        if self.packages:
            parts.append("packages " + " ".join(self.packages))
        if self.files:
            shown = ", ".join(list(self.files)[:3]) + (", ..." if len(self.files) > 3 else "")
            parts.append(f"files {shown}")
        if self.warmup:
            parts.append(f"{len(self.warmup)} warm-up")
        if self.mailboxes:
            parts.append(f"{len(self.mailboxes)} mailbox" + ("es" if len(self.mailboxes) > 1 else ""))
        if self.modules:
            parts.append("modules " + " ".join(self.modules))
        if self.kernel is not None:
            parts.append(f"kernel {self.kernel.name}")
        return ", ".join(parts)

    def image_spec(self) -> ImageSpec:
        return ImageSpec(
            kernel_flavour=self.kernel_flavour,
            packages=tuple(self.packages),
            files=tuple(self.files.items()),  # type: ignore[union-attr]
            kernel=None if self.kernel is None else str(self.kernel),
            kernel_modules=None if self.kernel_modules is None else str(self.kernel_modules),
        )

    def snapshot_key(self, *, accel: str, qemu_version: str) -> str:
        """Hash of everything that shapes the snapshot and nothing else."""
        doc = {
            "recipe": SNAPSHOT_RECIPE,
            "image": self.image_spec().key(),
            "cmdline": self.kernel_cmdline(),
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "warmup": [list(c) for c in self.warmup],
            "mailboxes": list(self.mailboxes),
            "guest_acked": list(self.guest_acked_mailboxes),
            "modules": list(self.modules),
            "accel": accel,
            "qemu": qemu_version,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]
