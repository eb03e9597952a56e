"""Sweeps kept VMs, only when asked (``vmfork gc --kept``): ``--vmfork-keep-failed``
keeps a failed test's VM for a post-mortem, as files under ``<run root>/kept/`` and a
snapshot in the cache (``vmfork kept`` lists them). Nothing else ever removes them;
one whose owner or QEMU still lives is left alone."""

from __future__ import annotations

import contextlib

from pytest_vmfork.janitor import processes
from pytest_vmfork.janitor.runs import KEPT
from pytest_vmfork.janitor.sweep import Sweep


def sweep(sw: Sweep) -> None:
    """Remove the kept snapshots in the cache, then ``<run root>/kept/``."""
    _snapshots(sw)
    kept = sw.run_root / KEPT
    if not kept.is_dir():
        return
    for path in sorted(kept.iterdir()):
        sw.check_time()
        handles, why = processes.handles_owner(path) if path.is_dir() else (None, None)
        if handles and why is None:
            sw.report.skip("kept", path, "its VM's owner is still alive")
            continue
        if processes.live_qemu_in(sw, path) is not None:
            sw.report.skip("kept", path, "a QEMU still runs in it")
            continue
        if path.is_dir() and not path.is_symlink():
            sw.rmtree("kept", path, "kept VM files (--kept)")
        elif sw.dry_run:
            sw.report.remove("kept", path, "kept VM files (--kept)")
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sw.report.remove("kept", path, "kept VM files (--kept)")


def _snapshots(sw: Sweep) -> None:
    """The snapshots --vmfork-keep-failed saved in the cache (``vmfork kept``)."""
    if sw.cache_dir is None:
        return
    from pytest_vmfork.vm.kept import list_kept  # only with --kept: vmfork gc stays light

    for k in list_kept(sw.cache_dir):
        sw.check_time()
        sw.rmtree("kept", k.dir, f"kept VM {k.name} of {k.test} (--kept)")
