"""Who QEMU runs as: settings, the setpriv command, creating the default user once
(real useradd/groupadd of a throwaway name, removed afterwards) and the files a
dropped QEMU is granted."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_vmfork import ConfigError
from pytest_vmfork.host import confine

REPO = Path(__file__).resolve().parents[2]


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("these tests create users and must run as root in CI")
        pytest.skip("creates users: run as root")


def test_a_setting_is_a_user_name_root_or_unset():
    assert confine.check_setting(None) is None and confine.check_setting("") is None
    assert confine.check_setting("root") == "root" and confine.check_setting("qemu_1-x") == "qemu_1-x"
    for bad in ("Root User", "../x", "-u0", "a" * 40, 0):
        with pytest.raises(ConfigError, match="is not a user name"):
            confine.check_setting(bad)


def test_a_dropping_setpriv_sets_every_id_no_new_privs_and_the_death_signal_last():
    user = confine.QemuUser("q", uid=os.geteuid() + 4242, gid=4243, groups=(4244,), ram_gid=4244)
    argv = user.prefix()
    assert argv[0] == "setpriv" and argv[-3:] == ["--pdeathsig", "KILL", "--"]
    assert {f"--reuid={os.geteuid() + 4242}", "--regid=4243", "--groups=4244", "--no-new-privs"} <= set(argv)
    same = confine.QemuUser("me", uid=os.geteuid(), gid=os.getegid())
    assert same.prefix() == ["setpriv", "--pdeathsig", "KILL", "--"] and not same.drops


def test_root_keeps_uid_0_only_when_asked_and_says_so():
    _need_root()
    kept = confine.resolve("root")
    assert (kept.uid, kept.gid) == (0, 0) and "NOT confined" in kept.describe()
    assert kept.prefix() == ["setpriv", "--pdeathsig", "KILL", "--"]
    with pytest.raises(ConfigError, match="'vmfork-nosuchuser' does not exist; create it .*useradd"):
        confine.check_user("vmfork-nosuchuser")


def exists(kind: str, name: str) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def throwaway_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh name standing in for vmfork-qemu (user and group), deleted afterwards."""
    _need_root()
    name = f"vmfq{secrets.token_hex(3)}"
    yield name
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["groupdel", name], capture_output=True, check=False)
    assert not exists('user', name) and not exists('group', name)


CREATE = """
import sys
from pytest_vmfork.host import confine
confine.DEFAULT_USER = confine.RAM_GROUP = sys.argv[1]
user = confine.resolve(None, progress=lambda m: print("MSG", m, flush=True))
print("USER", user.uid, user.gid, user.ram_gid, flush=True)
"""


def test_the_default_user_is_created_once_by_racing_processes(throwaway_default):
    name = throwaway_default
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, name], stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    entry, group = pwd.getpwnam(name), grp.getgrnam(name)
    assert entry.pw_uid != 0 and entry.pw_gid == group.gr_gid and entry.pw_shell == "/usr/sbin/nologin"
    users = {line for out in outs for line in out.splitlines() if line.startswith("USER")}
    assert users == {f"USER {entry.pw_uid} {group.gr_gid} {group.gr_gid}"}
    created = [line for out in outs for line in out.splitlines() if line.startswith("MSG vmfork: created")]
    assert len(created) == 1, outs


def test_a_configured_user_gets_the_ram_group_and_a_granted_file_opens_for_it(throwaway_default, tmp_path,
                                                                              monkeypatch):
    name = throwaway_default
    monkeypatch.setattr(confine, "DEFAULT_USER", name)
    monkeypatch.setattr(confine, "RAM_GROUP", name)
    other = f"{name}o"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", other], check=True,
                   capture_output=True)
    try:
        user = confine.resolve(other)  # creates the RAM group, not the default user
        assert not exists('user', name) and user.ram_gid == grp.getgrnam(name).gr_gid
        assert user.uid == pwd.getpwnam(other).pw_uid and user.ram_gid in user.groups
        ram = tmp_path / "memory.ram"
        ram.write_bytes(b"x")
        ram.chmod(0o600)
        tmp_path.chmod(0o700)
        fd = os.open(ram, os.O_RDONLY)
        try:
            user.grant(fd, ram, write=True)
            assert (ram.stat().st_gid, ram.stat().st_mode & 0o777) == (user.ram_gid, 0o660)
            opened = subprocess.run([*user.prefix(), sys.executable, "-c",
                                     f"import os; os.close(os.open('/proc/self/fd/{fd}', os.O_RDWR))"],
                                    pass_fds=(fd,), capture_output=True, text=True, check=False)
            assert opened.returncode == 0, opened.stderr  # through the fd, though the directory is closed to it
            direct = subprocess.run([*user.prefix(), sys.executable, "-c", f"open({str(ram)!r})"],
                                    capture_output=True, text=True, check=False)
            assert "PermissionError" in direct.stderr
        finally:
            os.close(fd)
    finally:
        subprocess.run(["userdel", other], capture_output=True, check=False)
        subprocess.run(["groupdel", other], capture_output=True, check=False)
