"""Fixtures for the project's own tests: one template (fixtures.templates.TEST_TEMPLATE)
so a single cached snapshot serves every VM test of the run."""

import pytest

from fixtures.templates import TEST_TEMPLATE
from pytest_vmfork import Template


@pytest.fixture(scope="session")
def vmfork_template() -> Template:
    return TEST_TEMPLATE
