"""Fixtures for the project's own tests: one template (fixtures.templates.TEST_TEMPLATE)
so a single cached snapshot serves every VM test of the run."""

import os

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
