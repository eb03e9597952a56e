"""vmfork_layer in real inner runs: built once across xdist workers, cached
across runs with a content key, removed at the end of a run without one."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from pytest_vmfork.layer import discard
from pytest_vmfork.plugin import SESSION_KEY

from .suites import CONFTEST
from .test_templates import run_inner, short_tmp, write_suite  # noqa: F401 (short_tmp: a fixture)

LAYER_SUITE = {
    "conftest.py": CONFTEST + """
import os
from pytest_vmfork import vmfork_layer

def seed(vm):
    with open(os.environ["LAYER_BUILDS"], "a") as f:  # host side: counts the builds of all workers
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    vm.exec("echo seeded > /root/seed && sync").check()

def scratch(vm):
    vm.exec("echo scratch > /root/scratch").check()

seeded = vmfork_layer(seed, key=os.environ["LAYER_KEY"], name="seeded")
per_run = vmfork_layer(scratch)
""",
    "test_uses.py": """
import pytest

@pytest.mark.parametrize("i", range(2))
def test_forks_of_the_layer_see_its_file(vm_factory, seeded, i):
    assert vm_factory(snapshot=seeded).exec(["cat", "/root/seed"]).stdout == b"seeded\\n"

def test_a_layer_without_key_works_too(vm_factory, per_run):
    assert vm_factory(snapshot=per_run).exec(["cat", "/root/scratch"]).stdout == b"scratch\\n"
""",
}


def _entries(snapshots: Path) -> dict[str, dict]:
    out = {}
    for manifest in snapshots.glob("*/manifest.json"):
        doc = json.loads(manifest.read_text())
        if doc.get("depth"):
            out[manifest.parent.name] = doc
    return out


def test_a_keyed_layer_is_built_once_across_workers_and_reused_by_the_next_run(
    tmp_path: Path, short_tmp: Path, request  # noqa: F811
):
    snapshots = request.config.stash[SESSION_KEY].settings.cache_dir / "snapshots"
    write_suite(tmp_path, LAYER_SUITE)
    builds = tmp_path / "builds.log"
    env = {"LAYER_KEY": secrets.token_hex(8), "LAYER_BUILDS": str(builds)}
    before = set(_entries(snapshots))
    try:
        code, out = run_inner(tmp_path, short_tmp, "-n", "2", "--dist", "each", **env)
        assert code == 0 and "6 passed" in out, out[-6000:]
        assert len(builds.read_text().split()) == 1, out[-6000:]  # two workers, one build
        made = {k: v for k, v in _entries(snapshots).items() if k not in before}
        # the keyed layer stays; the run's own (no key) was removed when the run ended
        assert [(v["name"], v["ephemeral"], v["depth"]) for v in made.values()] == [("seeded", False, 1)]
        assert "saved in this run" in out and "layer 'seeded', depth 1" in out

        code, out = run_inner(tmp_path, short_tmp, "-n", "2", "-k", "see_its_file", **env)
        assert code == 0 and "2 passed" in out, out[-6000:]
        assert len(builds.read_text().split()) == 1, out[-6000:]  # cached: not built again
        (key,) = made
        assert f"snapshot {key}: cache hit" in out
    finally:
        for key in set(_entries(snapshots)) - before:
            discard(snapshots / key)
