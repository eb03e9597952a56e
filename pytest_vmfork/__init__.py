"""pytest-vmfork: a real Linux VM per test, forked from a snapshot in milliseconds.

Library use, without pytest::

    from pytest_vmfork import Template, fork, snapshot_for

    snap = snapshot_for(Template(packages=["jq"]))  # cached, or booted once now
    with fork(snap) as vm:
        print(vm.exec(["uname", "-r"]).stdout)
"""

from pytest_vmfork.errors import (
    AckTimeout,
    AgentTimeout,
    BuildError,
    ConfigError,
    EventChannelError,
    GuestError,
    GuestFileError,
    HandoffError,
    ImageBuildError,
    ProcessTimeout,
    QemuTimeout,
    RestoreError,
    StateError,
    VMForkError,
)
from pytest_vmfork.host.run import Run
from pytest_vmfork.net.network import RunNetwork
from pytest_vmfork.vm.agent import ExecResult, ExecTimeout
from pytest_vmfork.vm.fork import VM, MailboxPayload, fork
from pytest_vmfork.vm.pool import WarmPool
from pytest_vmfork.vm.process import Process
from pytest_vmfork.vm.registry import snapshot_for
from pytest_vmfork.vm.snapshot import Snapshot, SnapshotStore
from pytest_vmfork.vm.state import VMState
from pytest_vmfork.vm.template import Template

__all__ = [
    "AckTimeout",
    "AgentTimeout",
    "BuildError",
    "ConfigError",
    "EventChannelError",
    "ExecResult",
    "ExecTimeout",
    "GuestError",
    "GuestFileError",
    "HandoffError",
    "ImageBuildError",
    "MailboxPayload",
    "Process",
    "ProcessTimeout",
    "QemuTimeout",
    "RestoreError",
    "Run",
    "RunNetwork",
    "Snapshot",
    "SnapshotStore",
    "StateError",
    "Template",
    "VM",
    "VMForkError",
    "VMState",
    "WarmPool",
    "fork",
    "snapshot_for",
    "vmfork_layer",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``vmfork_layer`` lives in the pytest plugin: imported on first use, so a
    script that only forks VMs does not import pytest."""
    if name == "vmfork_layer":
        from pytest_vmfork.plugin import vmfork_layer

        return vmfork_layer
    raise AttributeError(f"module 'pytest_vmfork' has no attribute {name!r}")
