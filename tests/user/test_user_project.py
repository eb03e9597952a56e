"""pytest-vmfork as its users get it: the built wheel, a fresh virtualenv outside this
checkout, a project of their own, a new non-root user with an empty cache.

The user is created here (``useradd``, which gives it /etc/subuid and /etc/subgid
ranges) and removed afterwards with everything it started. Its Python is the
system's ``/usr/bin/python3``; nothing of this checkout is on its path.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.checkout import build_lock
from tests.plugin.suites import finish

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
RUN_TIMEOUT_S = 1800.0

pytestmark = pytest.mark.vm


def _need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the user-project tests create users and must run as root in CI")
        pytest.skip("creates a user: run as root")


@dataclass
class User:
    name: str
    home: Path

    def run(self, command: str, *, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT_S,
            cwd: Path | None = None) -> tuple[int, str]:
        """Run ``command`` under sh as this user, with a clean login-like environment."""
        base = {"HOME": str(self.home), "USER": self.name, "PATH": "/usr/local/bin:/usr/bin:/bin",
                "LANG": "C.UTF-8"}
        argv = ["runuser", "-u", self.name, "--", "env", "-i",
                *[f"{k}={v}" for k, v in {**base, **(env or {})}.items()],
                "sh", "-c", f"cd {cwd or self.home} && {command}"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        return finish(proc, timeout)


def _create_user(subids: bool) -> User:
    name = f"vmfk{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    for kind in ("subuid", "subgid"):
        lines = Path(f"/etc/{kind}").read_text().splitlines() if Path(f"/etc/{kind}").exists() else []
        has = any(line.startswith(f"{name}:") for line in lines)
        if subids and not has:
            flag = "--add-subuids" if kind == "subuid" else "--add-subgids"
            start = 300000 + secrets.randbelow(1000) * 65536
            subprocess.run(["usermod", flag, f"{start}-{start + 65535}", name], check=True, capture_output=True)
        elif not subids and has:
            Path(f"/etc/{kind}").write_text("".join(f"{l}\n" for l in lines if not l.startswith(f"{name}:")))
    return User(name, Path(pwd.getpwnam(name).pw_dir))


def _remove_user(user: User) -> None:
    subprocess.run(["pkill", "-KILL", "-u", user.name], capture_output=True, check=False)
    subprocess.run(["userdel", "--remove", "--force", user.name], capture_output=True, check=False)
    for kind in ("subuid", "subgid"):
        path = Path(f"/etc/{kind}")
        if path.exists():
            lines = path.read_text().splitlines()
            path.write_text("".join(f"{l}\n" for l in lines if not l.startswith(f"{user.name}:")))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel .` builds from this checkout, readable by any user."""
    _need_root()
    out = tmp_path_factory.mktemp("wheel")
    with build_lock():
        res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                              "-q", "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (built,) = out.glob("pytest_vmfork-*.whl")
    public = Path("/tmp") / f"vmfork-test-wheel-{secrets.token_hex(4)}"
    public.mkdir(mode=0o755)
    target = public / built.name
    shutil.copy(built, target)
    target.chmod(0o644)
    yield target
    shutil.rmtree(public, ignore_errors=True)


def _install(user: User, wheel: Path) -> Path:
    code, out = user.run(f"{SYSTEM_PYTHON} -m venv venv && venv/bin/pip install -q --disable-pip-version-check "
                         f"{wheel}", timeout=900)
    assert code == 0, out[-3000:]
    return user.home / "venv/bin"


@pytest.fixture(scope="module")
def user(wheel: Path) -> Iterator[tuple[User, Path]]:
    """A new non-root user with subordinate ids and the wheel installed in its own venv."""
    user = _create_user(subids=True)
    try:
        yield user, _install(user, wheel)
    finally:
        _remove_user(user)


def test_the_wheel_carries_the_guest_tree_and_the_shared_modules(wheel: Path) -> None:
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for rel in ("agent.py", "inittab", "rc.sh", "initramfs-init.sh", "vmfork-ack", "fetch-kernel.sh"):
        assert f"pytest_vmfork/guest/{rel}" in names
    assert {"pytest_vmfork/mailbox.py", "pytest_vmfork/proto/agent_pb2.py"} <= names
    assert not [n for n in names if n.startswith(("guest/", "tests/", "fixtures/"))]


def test_the_sdist_carries_the_guest_tree_and_builds_the_same_wheel(tmp_path: Path) -> None:
    import tarfile
    import zipfile

    with build_lock():
        res = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(REPO)],
                             capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (sdist,) = tmp_path.glob("pytest_vmfork-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("/guest/agent.py") for n in names) and any(n.endswith("/guest/fetch-kernel.sh")
                                                                       for n in names)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"),
                          str(sdist)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (whl,) = (tmp_path / "w").glob("*.whl")
    assert "pytest_vmfork/guest/agent.py" in zipfile.ZipFile(whl).namelist()


def test_a_new_user_runs_a_project_of_its_own_and_a_moved_cache_hits(user: tuple[User, Path]) -> None:
    u, bin_dir = user
    code, doctor = u.run(f"{bin_dir}/vmfork doctor")
    assert code == 0 and "verdict: ready" in doctor, doctor
    assert "unshare mode" in doctor, doctor

    project = u.home / "project"
    shutil.copytree(REPO / "fixtures/userproject", project)
    subprocess.run(["chown", "-R", f"{u.name}:", str(project)], check=True)
    assert not (u.home / ".cache/pytest-vmfork").exists()  # an empty cache

    code, first = u.run(f"{bin_dir}/pytest -v -rA", cwd=project)
    assert code == 0, first[-8000:]
    assert re.search(r"\b3 passed\b", first), first[-3000:]
    assert "unshare mode" in first and "building guest image" in first, first[-3000:]
    assert re.search(r"snapshot \w+: built in", first), first[-3000:]
    assert "user-mode networking" in first  # no CAP_NET_ADMIN for this user
    assert re.search(r"vmfork: accelerator (kvm|tcg \(KVM unusable: .*; details: .*/probes/kvm-\w+\.json\))\n",
                     first), first

    # The cache moves: a copy at another path, the original gone, is a cache hit.
    moved = u.home / "elsewhere/cache"
    code, out = u.run(f"mkdir -p {moved.parent} && cp -a .cache/pytest-vmfork {moved} && "
                      f"mv .cache/pytest-vmfork .cache/gone")
    assert code == 0, out
    code, second = u.run(f"{bin_dir}/pytest -v", cwd=project, env={"VMFORK_CACHE_DIR": str(moved)})
    assert code == 0, second[-8000:]
    assert re.search(r"\b3 passed\b", second) and re.search(r"snapshot \w+: cache hit", second), second[-3000:]
    assert "building guest image" not in second and "booting template" not in second, second[-3000:]
    code, listing = u.run(f"{bin_dir}/vmfork cache --cache-dir {moved}")  # the moved cache's last uses
    assert code == 0 and re.search(r"^snapshot +\w+ +\S+ +(just now|\d+m ago) +template: ", listing, re.M), listing
    left = subprocess.run(["pgrep", "-u", u.name, "qemu-system"], capture_output=True, text=True).stdout
    assert left == "", f"QEMU processes of {u.name} outlived its runs: {left}"


def test_a_user_without_subordinate_ids_builds_in_fakechroot_mode_and_doctor_says_so(wheel: Path) -> None:
    u = _create_user(subids=False)
    try:
        bin_dir = _install(u, wheel)
        code, out = u.run(f"{bin_dir}/vmfork doctor --build-mode unshare")
        assert code == 1 and "verdict: NOT ready" in out, out
        assert f"add the line '{u.name}:100000:65536'" in out and "/etc/subuid" in out, out
        code, out = u.run(f"{bin_dir}/vmfork doctor")
        assert code == 0 and "fakechroot mode" in out and "verdict: ready" in out, out
        # ... and doctor's word holds: a real build and a fork, as that user.
        code, out = u.run(f"{bin_dir}/vmfork build --accel tcg")
        assert code == 0 and "fakechroot mode" in out and "built in" in out, out[-4000:]
        code, out = u.run(f"{bin_dir}/vmfork run --accel tcg -- sh -c "
                          "'id -u; id nobody; for t in nohup ps ip; do command -v $t; done'")
        assert code == 0, out[-4000:]
        lines = out.splitlines()
        assert "0" in lines and "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)" in lines, out
        assert {"/usr/bin/nohup", "/usr/bin/ps", "/usr/sbin/ip"} <= set(lines), out
    finally:
        _remove_user(u)
