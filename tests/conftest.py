"""Fixtures for the project's own tests: one template (fixtures.templates.TEST_TEMPLATE)
so a single cached snapshot serves every VM test of the run."""

import os
import pwd
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from fixtures.templates import TEST_TEMPLATE
from pytest_vmfork import Template
from pytest_vmfork.plugin import SESSION_KEY


@pytest.fixture(scope="session")
def vmfork_template() -> Template:
    return TEST_TEMPLATE


@pytest.fixture(scope="session", autouse=True)
def _inner_runs_share_the_cache(request: pytest.FixtureRequest) -> None:
    """Inner pytest runs (pytester, subprocesses) must find this run's image and
    snapshot: pytester points HOME elsewhere, which would move the default cache."""
    os.environ.setdefault("VMFORK_CACHE_DIR", str(request.config.stash[SESSION_KEY].settings.cache_dir))


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A real second, unprivileged user (useradd), removed after the session."""
    name = f"vmfk-{secrets.token_hex(3)}"
    for attempt in range(20):  # /etc/passwd may be locked by a concurrent useradd
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                              capture_output=True, text=True, check=False)
        if made.returncode == 0:
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"useradd {name} failed: {made.stderr}")
    try:
        entry = pwd.getpwnam(name)
        yield OtherUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        for attempt in range(20):
            if subprocess.run(["userdel", name], capture_output=True, check=False).returncode in (0, 6):  # 6: no such user
                break
            time.sleep(0.25)
