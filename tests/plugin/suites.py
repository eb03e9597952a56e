"""Shared by the plugin tests: the conftest every generated user suite gets.

It selects fixtures.templates.TEST_TEMPLATE, so the inner runs reuse the
snapshot the outer run already cached instead of booting another template.
"""

import os
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CONFTEST = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import pytest
from fixtures.templates import TEST_TEMPLATE

@pytest.fixture(scope="session")
def vmfork_template():
    return TEST_TEMPLATE
"""


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for an inner run (bounded); on timeout kill its whole process group."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"inner run did not finish within {timeout}s:\n{out[-5000:]}") from None
    return proc.returncode, out
