"""Sharding one suite over several machines: each shard runs its slice of the node ids
with pytest-xdist, on its own copy of one cache artefact keyed by `vmfork key`."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from .suites import CONFTEST, finish

RUN_TIMEOUT = 600.0
SHARDS = 2

TESTS_A = """
import pytest

@pytest.mark.parametrize("n", range(5))
def test_each_gets_a_fork(vm, n):
    assert vm.exec(["sh", "-c", f"echo {n} > /tmp/n && cat /tmp/n"]).stdout == f"{n}\\n".encode()
"""

TESTS_B = """
def test_hello(vm):
    assert vm.exec(["hello"]).stdout.startswith(b"hello from")

def test_warmed(vm):
    assert vm.exec(["cat", "/root/warmup-done"]).stdout == b"warmed\\n"
"""


def env_for(cache_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFORK_")) and k != "PYTHONPATH"}
    env.update(VMFORK_CACHE_DIR=str(cache_dir), VMFORK_NETWORK="user")
    return env


def test_two_shards_with_copies_of_one_cache_are_both_cache_hits_and_run_every_test_once(tmp_path, vmfork_snapshot):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST)
    (suite / "test_a.py").write_text(TESTS_A)
    (suite / "test_b.py").write_text(TESTS_B)

    # The artefact a first CI job saved: the cache dir, keyed by `vmfork key`.
    key = subprocess.run([sys.executable, "-m", "pytest_vmfork.cli", "key", "--template", "conftest:vmfork_template"],
                         cwd=suite, capture_output=True, text=True, check=True).stdout.strip()
    assert key == vmfork_snapshot.manifest["image_key"]
    shared = vmfork_snapshot.dir.parent.parent
    artefact = tmp_path / f"vmfork-cache-{key[:16]}"
    for sub in ("snapshots", "images"):
        (artefact / sub).mkdir(parents=True)
    subprocess.run(["cp", "-a", "--sparse=always", str(vmfork_snapshot.dir), str(artefact / "snapshots")], check=True)
    subprocess.run(["cp", "-a", str(shared / "images" / key), str(artefact / "images")], check=True)
    subprocess.run(["cp", "-a", str(shared / "probes"), str(artefact)], check=True)
    subprocess.run(["cp", "-a", str(shared / "modules"), str(artefact)], check=True)  # the kernel's module tree

    collected = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q"],
                               cwd=suite, env=env_for(tmp_path / "unused"), capture_output=True, text=True, check=True)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(ids) == 7, collected.stdout

    ran: list[tuple[str, str]] = []
    for shard in range(SHARDS):
        restored = tmp_path / f"shard{shard}" / "cache"  # each CI job restores its own copy
        restored.parent.mkdir()
        subprocess.run(["cp", "-a", "--sparse=always", str(artefact), str(restored)], check=True)
        restored.chmod(0o700)
        junit = tmp_path / f"shard{shard}" / "junit.xml"
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", f"--junitxml={junit}",
             *ids[shard::SHARDS]],
            cwd=suite, env=env_for(restored), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        code, out = finish(proc, RUN_TIMEOUT)
        assert code == 0, out
        assert "cache hit (no template boot)" in out, out
        assert "booting template" not in out and "building guest image" not in out, out
        assert not (restored / "roots").exists(), "a shard built a Debian root"
        ran += [(case.get("classname", ""), case.get("name", ""))
                for case in ET.parse(junit).getroot().iter("testcase")]
    assert len(ran) == len(ids) == len(set(ran)), ran  # every test once, none twice
