"""A suite of small tests, timed as a user runs it, for comparing checkouts and the pool:

    python tests/bench/suite_ab.py CACHE_DIR TESTS POOL_SIZE LABEL

writes a pytest project of TESTS tests (each: a fork of the stock template with one
mailbox payload, 4 commands), runs it once untimed (the image and snapshot are then
cached), then once timed with ``-n 2`` and ``vmfork_pool_size=POOL_SIZE``, and prints
one JSON line: wall seconds, tests/s, the run's exit status. Uses the ``python`` that
runs it (its checkout's pytest-vmfork), so the same script measures both checkouts;
run them in alternating blocks on one machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFTEST = '''
import pytest
from pytest_vmfork import Template

@pytest.fixture(scope="session")
def vmfork_template():
    return Template(mailboxes=["app-config"])
'''

TESTS = '''
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_small(vm_factory, n):
    vm = vm_factory(mailboxes={{"app-config": {{"n": n}}}})
    for argv in (["true"], ["echo", "hi"], ["cat", "/etc/hostname"], ["sh", "-c", "exit 0"]):
        assert vm.exec(argv).returncode == 0
'''


def run_suite(project: Path, cache: str, pool: int, workers: int, target: str) -> tuple[float, int, str]:
    env = {**os.environ, "VMFORK_CACHE_DIR": cache, "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "-n", str(workers),
         "-o", f"vmfork_pool_size={pool}"],
        cwd=project, env=env, capture_output=True, text=True, timeout=3600, check=False)
    return time.monotonic() - t0, done.returncode, done.stdout[-3000:]


def main() -> None:
    cache, n, pool, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    with tempfile.TemporaryDirectory(prefix="vmfork-suite-") as tmp:
        project = Path(tmp)
        (project / "conftest.py").write_text(CONFTEST)
        (project / "test_small.py").write_text(TESTS.format(n=n))
        (project / "pytest.ini").write_text("[pytest]\n")
        run_suite(project, cache, 0, 1, "test_small.py::test_small[0]")  # builds the snapshot: not timed
        wall, code, out = run_suite(project, cache, pool, 2, str(project))
    summary = [line for line in out.splitlines()
               if "restore-to-healthy p50" in line or "first exec" in line][:2]
    print(json.dumps({"label": label, "tests": n, "pool": pool, "exit": code, "wall_s": round(wall, 1),
                      "tests_per_s": round(n / wall, 2), "load": round(os.getloadavg()[0], 1),
                      "summary": summary}))


if __name__ == "__main__":
    main()
