"""Shared by the plugin tests: the conftest every generated user suite gets.

It selects fixtures.templates.TEST_TEMPLATE, so the inner runs reuse the
snapshot the outer run already cached instead of booting another template.
"""

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
