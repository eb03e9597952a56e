"""The template -> snapshot map: what makes two templates the same, and bad input
rejected before anything boots (the VM side is in tests/plugin/test_templates.py)."""

import os
import tempfile

import pytest

from pytest_vmfork import ConfigError, Run, Template, snapshot_for
from pytest_vmfork.vm.registry import SnapshotRegistry, content_id


def test_equal_recipes_share_one_content_id_and_any_difference_splits_them():
    a = Template(packages=["jq", "tree"], files={"/etc/x": "1"}, mailboxes=["m"])
    assert content_id(a) == content_id(Template(packages=["tree", "jq"], files={"/etc/x": b"1"}, mailboxes=["m"]))
    others = [
        Template(packages=["jq"], files={"/etc/x": "1"}, mailboxes=["m"]),
        Template(packages=["jq", "tree"], files={"/etc/x": "2"}, mailboxes=["m"]),
        Template(packages=["jq", "tree"], files={"/etc/y": "1"}, mailboxes=["m"]),
        Template(packages=["jq", "tree"], files={"/etc/x": "1"}, mailboxes=["n"]),
        Template(packages=["jq", "tree"], files={"/etc/x": "1"}, mailboxes=["m"], memory_mib=512),
        Template(packages=["jq", "tree"], files={"/etc/x": "1"}, mailboxes=["m"], warmup=["true"]),
    ]
    assert len({content_id(t) for t in [a, *others]}) == len(others) + 1


def test_a_non_template_is_refused_naming_its_type(tmp_path):
    registry = SnapshotRegistry(tmp_path, run=Run(root=tmp_path / "runs"))
    with pytest.raises(ConfigError, match="vmfork_template must return a pytest_vmfork.Template, got dict"):
        registry.get({"memory_mib": 512})  # type: ignore[arg-type]
    assert registry.entries() == []


def test_snapshot_for_refuses_an_unknown_accelerator_and_leaves_no_run_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where runs get their directory
    with pytest.raises(ConfigError, match="accel='xen' is not one of auto, tcg, kvm"):
        snapshot_for(Template(), cache_dir=tmp_path / "cache", accel="xen")
    assert not any((tmp_path / f"vmfork-{os.getuid()}").iterdir())
