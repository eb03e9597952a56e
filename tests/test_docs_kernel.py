"""Every example in docs/kernel.md, and the README's ``own-kernel``, runs as written (same
format and runner as README's).

The ``kernel-own`` example gets Debian's own kernel laid out as a kernel build tree
(fixtures.kernels.debian_kernel_build) in ``LINUX_BUILD``: a kernel known to boot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.kernels import debian_kernel_build
from pytest_vmfork import Template
from pytest_vmfork.build.image import build_image
from pytest_vmfork.config import default_cache_dir
from tests.examples import REPO, examples_in
from tests.test_readme import run_example

DOC = REPO / "docs" / "kernel.md"
EXAMPLES = {**examples_in(DOC), "own-kernel": examples_in(REPO / "README.md")["own-kernel"]}


def test_kernel_doc_has_its_examples() -> None:
    assert set(EXAMPLES) == {"kernel-modules", "kernel-own", "own-kernel"}


@pytest.mark.vm
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_kernel_doc_example_runs_as_written(name: str, tmp_path: Path) -> None:
    env = {}
    if name in ("kernel-own", "own-kernel"):
        cache = Path(os.environ.get("VMFORK_CACHE_DIR") or default_cache_dir())
        build = debian_kernel_build(build_image(Template().image_spec(), cache), tmp_path / "linux")
        env["LINUX_BUILD"] = str(build)
    run_example(f"kernel example {name!r}", EXAMPLES[name], tmp_path / "project", env=env)
