"""Who QEMU runs as, and what it is given: never uid 0, and no path it must open.

A QEMU runs whatever the guest does; a device-emulation or TCG bug the guest
reaches runs with QEMU's credentials. So when pytest-vmfork runs as root, every
QEMU (template boot, forks, warm pool) is started through ``setpriv`` as an
unprivileged user: by default the system user ``vmfork-qemu`` (created on first
use), or the one ``--vmfork-qemu-user`` / ``vmfork_qemu_user`` names;
``root`` keeps uid 0 (reported, not recommended). Run as anyone else, QEMU runs
as that user, as before. ``setpriv`` sets the parent-death signal *after* the
credential change (which would clear it), so QEMU still dies with its owner.

The QEMU user needs no access to our private directories: :class:`Handoff`
opens every file and socket here and QEMU inherits the descriptors. Sockets
are one end of a socketpair (``-chardev socket,fd=N``), the console log and the
root disk are ``-add-fd`` fdsets (QEMU's own open calls understand
``/dev/fdset/N``), and the kernel, initrd and guest RAM file are
``/proc/self/fd/N``: x86 kernel loading and QEMU 7.2's memory-backend-file open
a path, and re-opening a magic link skips the parent directories' permissions
but checks the file's own. QEMU 7.2 opens the RAM file read-write even for a
private mapping, so a snapshot's RAM file is group read-write for the group
:data:`RAM_GROUP` (``vmfork-qemu``), whichever user QEMU runs as (a configured
user gets that group as a supplementary one): the cache's files never change
hands between users. Image files are world-readable as built (else that group
is given read). :mod:`pytest_vmfork.host.private` accepts exactly that group's write
bit on exactly the RAM files.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from pytest_vmfork.errors import ConfigError

#: The system user QEMU runs as when root starts it and nothing else is configured.
DEFAULT_USER = "vmfork-qemu"
#: The group that may write snapshot RAM files (the default user's primary group).
RAM_GROUP = DEFAULT_USER
#: The explicit opt-out: QEMU keeps uid 0.
KEEP_ROOT = "root"
#: Serialises ``useradd``/``groupadd`` across processes (parallel xdist workers,
#: concurrent runs): in a root-only directory, so nobody else can plant the lock file.
USERADD_LOCK = Path("/run/lock" if os.path.isdir("/run/lock") else "/run") / "vmfork-qemu-user.lock"
USERADD_TIMEOUT_S = 60.0
KVM_DEVICE = "/dev/kvm"
_NAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")
_lock = threading.Lock()

Progress = Callable[[str], None]


def check_setting(value: object) -> str | None:
    """A ``qemu_user`` setting, validated (before any VM or user is touched):
    None or "" for the default, ``root``, or a user name."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(
            f"vmfork qemu user {value!r} is not a user name; use an existing unprivileged user, "
            f"leave it unset for {DEFAULT_USER} (created when needed) or use {KEEP_ROOT} to keep uid 0"
        )
    return value


@dataclass(frozen=True)
class QemuUser:
    """The credentials every QEMU of a run gets, resolved once."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary (RAM_GROUP's, a ``kvm`` group); never 0
    why: str = ""  # for the one-line report
    ram_gid: int | None = None  # the group that may write RAM files (RAM_GROUP's), if any

    @property
    def drops(self) -> bool:
        """True when QEMU runs under other credentials than this process (root dropping them)."""
        return self.uid != os.geteuid()

    def prefix(self) -> list[str]:
        """The ``setpriv`` command QEMU's argv is appended to: credentials (when they
        change), no new privileges, then the parent-death signal (set last: a
        credential change clears it), so a killed owner never leaves QEMU behind."""
        argv = ["setpriv"]
        if self.drops:
            argv += [f"--reuid={self.uid}", f"--regid={self.gid}",
                     f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups",
                     "--no-new-privs"]
        return [*argv, "--pdeathsig", "KILL", "--"]

    def describe(self) -> str:
        """One line for the run's output: which uid QEMU runs as and why."""
        return f"vmfork: QEMU runs as {self.name} (uid {self.uid}): {self.why}"

    def require_kvm(self) -> None:
        """ConfigError (before QEMU starts) when this user cannot open /dev/kvm."""
        if not self.drops:
            return
        try:
            st = os.stat(KVM_DEVICE)
        except OSError as exc:
            raise ConfigError(f"{KVM_DEVICE}: {exc.strerror}; use --vmfork-accel=tcg") from exc
        shift = 0 if st.st_uid == self.uid else 3 if st.st_gid in (self.gid, *self.groups) else 6
        need = (stat.S_IRUSR | stat.S_IWUSR) >> shift
        if st.st_mode & need != need:
            group = _group_name(st.st_gid)
            raise ConfigError(
                f"QEMU runs as {self.name} (uid {self.uid}), which cannot open {KVM_DEVICE} (mode "
                f"{stat.S_IMODE(st.st_mode):04o}, group {group}); give a group read-write on it and add the "
                f"user to it (chgrp kvm {KVM_DEVICE} && chmod 0660 {KVM_DEVICE} && usermod -aG kvm {self.name}), "
                f"or use --vmfork-accel=tcg, or --vmfork-qemu-user={KEEP_ROOT} to keep uid 0"
            )

    def grant(self, fd: int, path: Path, *, write: bool) -> None:
        """Make the file open on ``fd`` openable by QEMU through /proc/self/fd (read,
        or read-write): its group becomes :data:`RAM_GROUP` with the needed bits;
        nothing is added for others. A no-op when QEMU is us or it already can."""
        if not self.drops or self.ram_gid is None:
            return
        st = os.fstat(fd)
        if not write and st.st_mode & stat.S_IROTH:
            return
        bits = stat.S_IRGRP | (stat.S_IWGRP if write else 0)
        if st.st_gid == self.ram_gid and st.st_mode & bits == bits:
            return
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{path} is owned by uid {st.st_uid}: cannot let QEMU ({self.name}) open it; "
                              "remove the cache entry so it is rebuilt")
        mode = stat.S_IMODE(st.st_mode)
        if st.st_gid != self.ram_gid:
            os.fchown(fd, -1, self.ram_gid)
            mode &= ~stat.S_IWGRP  # the old group's write goes with it
        os.fchmod(fd, mode | bits)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_named(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _group_named(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _lookup(name: str) -> pwd.struct_passwd:
    """An existing unprivileged user, or ConfigError naming it and the fix."""
    entry = _user_named(name)
    if entry is None:
        raise ConfigError(
            f"vmfork qemu user {name!r} does not exist; create it (useradd --system --no-create-home "
            f"--shell /usr/sbin/nologin --user-group {name}), or leave the setting unset to use "
            f"{DEFAULT_USER} (created when needed)"
        )
    groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if entry.pw_uid == 0 or 0 in groups:
        which = "uid 0" if entry.pw_uid == 0 else "group 0 (root)"
        raise ConfigError(
            f"vmfork qemu user {name!r} has {which}: QEMU would keep root's privileges; name an "
            f"unprivileged user, leave it unset for {DEFAULT_USER}, or use {KEEP_ROOT} to keep uid 0 explicitly"
        )
    return entry


def check_user(setting: str | None) -> None:
    """Fail early (ConfigError) for a configured user QEMU cannot run as; no side effects."""
    name = check_setting(setting)
    if os.geteuid() == 0 and name not in (None, KEEP_ROOT):
        _lookup(name)


def resolve(setting: str | None, *, progress: Progress | None = None) -> QemuUser:
    """The user QEMU runs as under ``setting`` (see :func:`check_setting`).

    Not root: this process's user (a setting does not apply: QEMU cannot switch).
    Root: ``root`` keeps uid 0; a name must be an existing unprivileged user
    (ConfigError naming it and the fix otherwise); unset is :data:`DEFAULT_USER`.
    The default user and :data:`RAM_GROUP` are created with ``useradd`` /
    ``groupadd`` if missing, once, under a lock shared by every process."""
    name = check_setting(setting)
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name if _uid_known(os.geteuid()) else str(os.geteuid())
        why = "the invoking user" + (f" (vmfork_qemu_user={name} applies only to runs as root)" if name else "")
        return QemuUser(me, os.geteuid(), os.getegid(), (), why)
    if name == KEEP_ROOT:  # RAM files other runs gave to RAM_GROUP stay trusted: no rebuild for the opt-out
        ram = _group_named(RAM_GROUP)
        return QemuUser("root", 0, 0, (), f"kept by vmfork_qemu_user={KEEP_ROOT}: QEMU is NOT confined to an "
                                           "unprivileged user", ram_gid=ram.gr_gid if ram else None)
    entry = _lookup(name) if name is not None else None
    ram = _ensure(user=entry is None, progress=progress)
    entry = entry or _lookup(DEFAULT_USER)
    supplementary = set(os.getgrouplist(entry.pw_name, entry.pw_gid)) | {ram.gr_gid}
    why = "configured (vmfork_qemu_user), not root" if name else "the default unprivileged user, not root"
    return QemuUser(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(sorted(supplementary - {entry.pw_gid})),
                    why, ram_gid=ram.gr_gid)


def _uid_known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _ensure(*, user: bool, progress: Progress | None) -> grp.struct_group:
    """:data:`RAM_GROUP` (and, with ``user``, :data:`DEFAULT_USER` in it): created
    if missing, once, however many processes ask at once."""
    if _group_named(RAM_GROUP) and (not user or _user_named(DEFAULT_USER)):
        return _group_named(RAM_GROUP)  # type: ignore[return-value]
    with _lock, FileLock(str(USERADD_LOCK), timeout=USERADD_TIMEOUT_S):
        if not _group_named(RAM_GROUP):
            _add(["groupadd", "--system", RAM_GROUP], lambda: _group_named(RAM_GROUP) is not None)
        if user and not _user_named(DEFAULT_USER):
            kvm = ["--groups", "kvm"] if _group_named("kvm") else []  # /dev/kvm, where udev gives it to kvm
            _add(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                  "/usr/sbin/nologin", "--gid", RAM_GROUP, *kvm, "--comment", "pytest-vmfork QEMU", DEFAULT_USER],
                 lambda: _user_named(DEFAULT_USER) is not None)
            if progress is not None:
                progress(f"vmfork: created the system user {DEFAULT_USER} that QEMU runs as")
    return _group_named(RAM_GROUP)  # type: ignore[return-value]


def _add(argv: list[str], exists: Callable[[], bool]) -> None:
    """Run ``useradd``/``groupadd``; retried (bounded) while another tool holds the
    passwd lock. ConfigError naming the command and the fix if it fails."""
    deadline = time.monotonic() + USERADD_TIMEOUT_S
    while True:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=USERADD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConfigError(f"could not run `{' '.join(argv)}`: {exc}; create the QEMU user "
                              f"{DEFAULT_USER} yourself or name another with --vmfork-qemu-user") from exc
        if done.returncode == 0 or exists():  # made, or by a process outside our lock
            return
        if "lock" not in done.stderr or time.monotonic() > deadline:
            raise ConfigError(
                f"`{' '.join(argv)}` exited with {done.returncode}: {done.stderr.strip()[-300:]}; create the "
                f"QEMU user {DEFAULT_USER} yourself or name another with --vmfork-qemu-user"
            )
        time.sleep(0.25)


def ram_group_gid() -> int | None:
    """The gid of :data:`RAM_GROUP` if it exists."""
    group = _group_named(RAM_GROUP)
    return group.gr_gid if group else None


def default_uid() -> int | None:
    """The uid of :data:`DEFAULT_USER` if it exists (gc recognises our QEMUs by it)."""
    entry = _user_named(DEFAULT_USER)
    return entry.pw_uid if entry else None


@dataclass
class Handoff:
    """Everything one QEMU opens, opened here and inherited as descriptors.

    Build the command line with it (:meth:`image`, :meth:`ram`, :meth:`fdset`,
    :meth:`socket`), spawn QEMU with ``pass_fds=handoff.fds``, then
    :meth:`release` the child's copies; :attr:`sockets` holds our ends. The
    descriptors keep their numbers in QEMU (``pass_fds``), so the argv can name them.
    """

    user: QemuUser
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)  # -add-fd ...
    _fds: list[int] = field(default_factory=list)
    _sets: int = 0

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(self._fds)

    def _open(self, path: Path, flags: int, mode: int = 0o600) -> int:
        """Open ``path`` for QEMU; a file created here is never created through a symlink."""
        fd = os.open(path, flags | (os.O_NOFOLLOW if flags & os.O_CREAT else 0) | os.O_CLOEXEC, mode)
        self._fds.append(fd)
        return fd

    def image(self, path: Path) -> str:
        """A read-only image file QEMU opens by path (kernel, initrd): ``/proc/self/fd/N``."""
        fd = self._open(path, os.O_RDONLY)
        self.user.grant(fd, path, write=False)
        return f"/proc/self/fd/{fd}"

    def ram(self, path: Path, size: int, *, create: bool) -> str:
        """The guest RAM file: created (``create``: the template's, sized ``size``,
        never through a symlink or over an existing file) or an existing one;
        read-write for QEMU's group either way. ``/proc/self/fd/N``."""
        if create:
            fd = self._open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            os.ftruncate(fd, size)
        else:
            fd = self._open(path, os.O_RDONLY)
        self.user.grant(fd, path, write=True)
        return f"/proc/self/fd/{fd}"

    def fdset(self, path: Path, flags: int) -> str:
        """A file QEMU opens with its own open call (a file chardev, a block device):
        an fdset (``-add-fd``), named ``/dev/fdset/N``. Its opaque text is
        ``path=<path>``, so the command line still says which file it is (gc finds
        a VM's directory by its console log's)."""
        fd = self._open(path, flags)
        self._sets += 1
        escaped = str(path).replace(",", ",,")
        self.options += ["-add-fd", f"fd={fd},set={self._sets},opaque=path={escaped}"]
        return f"/dev/fdset/{self._sets}"

    def socket(self, name: str) -> int:
        """A connected stream socket pair: QEMU's end (its fd number, for
        ``-chardev socket,fd=N``); ours is ``sockets[name]``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sockets[name] = ours
        fd = theirs.detach()
        self._fds.append(fd)
        return fd

    def release(self) -> None:
        """Close this process's copies of QEMU's descriptors (after the spawn, or on
        failure): QEMU holds its own; ours would keep a dead QEMU's sockets open."""
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def close(self) -> None:
        """Release everything, our socket ends included (a start that failed)."""
        self.release()
        for sock in self.sockets.values():
            sock.close()
