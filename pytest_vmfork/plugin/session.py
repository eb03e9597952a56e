"""The plugin's per-process state: settings, the run, snapshots, warm pools, layers,
kept VMs and the statistics the run summary prints.

Kept apart from plugin.py (hooks and fixtures only), as pytest-xdist keeps its
scheduling session apart from its hooks. It knows pytest's config and items (for
progress lines past output capture and for naming kept VMs) but forks through the
library (``fork()``, ``WarmPool``, ``SnapshotRegistry``) like any script would.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from filelock import FileLock

from pytest_vmfork.build.image import BuildOptions
from pytest_vmfork.config import Settings
from pytest_vmfork.errors import BuildError, ConfigError, VMForkError
from pytest_vmfork.host import private
from pytest_vmfork.host.run import Run, base_dir
from pytest_vmfork.net.network import RunNetwork, has_net_admin
from pytest_vmfork.plugin.stats import RunStats
from pytest_vmfork.vm.fork import VM, Network, fork
from pytest_vmfork.vm.kept import identity as kept_identity
from pytest_vmfork.vm.layer import discard, layer_key, run_layers
from pytest_vmfork.vm.pool import WarmPool
from pytest_vmfork.vm.registry import SnapshotRegistry
from pytest_vmfork.vm.snapshot import Snapshot, incompatibility, record_use
from pytest_vmfork.vm.state import VMState
from pytest_vmfork.vm.template import Template

#: the VMs a test item made (the ``vm`` fixture, ``vm_factory``), for failure reports and kept VMs
ITEM_VMS = pytest.StashKey[list[VM]]()


class VMForkSession:
    """Per-process state: settings, run directory, snapshots, statistics."""

    def __init__(self, config: pytest.Config, settings: Settings, run: Run, stats: RunStats) -> None:
        self.config = config
        self.settings = settings
        self.run = run
        self.stats = stats
        self.registry = SnapshotRegistry(
            settings.cache_dir, run=run, accel=settings.accel, rebuild=settings.rebuild, progress=self.progress,
            build=BuildOptions(apt_sources=settings.apt_sources, mode=settings.build_mode), verbose=config.getoption("verbose", 0) > 0,
        )
        self.foreign: dict[str, Snapshot] = {}  # every snapshot forked from, by key (vm_factory(snapshot=) too)
        self.live: set[VM] = set()
        self._network: Network = None
        self._run_network: RunNetwork | None = None
        self.pools: dict[str, WarmPool] = {}
        self.unshown: list[str] = []
        self.layers: dict[str, Snapshot] = {}

    def network(self) -> Network:
        """The forks' network mode, resolved (and a TAP run network brought up) once."""
        if self._network is None:
            mode = self.settings.network
            if mode == "auto":
                mode = "tap" if has_net_admin() else "user"
                if mode == "user":
                    self.progress(
                        "vmfork: no CAP_NET_ADMIN: forks use QEMU user-mode networking (outbound "
                        "only; reach a guest port with vm.host_port(port); forks cannot reach each other)"
                    )
            if mode == "tap":
                self._run_network = RunNetwork(
                    self.run.run_id, pool=self.settings.subnet_pool, lease_root=self.settings.lease_dir
                ).up()
                for stale in self._run_network.reclaimed:
                    self.progress(f"vmfork: reclaimed stale network lease {stale.subnet} of run {stale.run_id}")
                self._network = self._run_network
            else:
                self._network = mode
        return self._network

    def progress(self, message: str) -> None:
        """Show a message now (past output capture); xdist workers cannot write to
        the terminal, so theirs are repeated by the controller in the summary."""
        self.stats.messages.append(message)
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if hasattr(self.config, "workerinput"):
            return
        if reporter is None:  # too early (pytest_configure): shown at session start
            self.unshown.append(message)
            return
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(message)
        else:
            reporter.write_line(message)

    def snapshot(self, template: Template) -> Snapshot:
        """``template``'s snapshot: looked up (or booted) once per process, then memoized."""
        return self.registry.get(template)

    def fork(self, snapshot: Snapshot, mailboxes: dict[str, Any] | None = None) -> VM:
        network = self.network()
        pool = self.pools.get(snapshot.key)
        if snapshot.key not in self.foreign:  # once per snapshot: vm.snapshot()'s and vm_factory(snapshot=)'s too
            record_use(snapshot)
        vm = fork(
            snapshot,
            run=self.run,
            mailboxes=mailboxes,
            network=network,
            ready_timeout=self.settings.ready_timeout,
            handoff_timeout=self.settings.handoff_timeout,
            pool=pool,
        )
        if pool is None and self.settings.pool_size:  # after the first fork proved the snapshot works
            self.pools[snapshot.key] = WarmPool(snapshot, self.run, network, self.settings.pool_size,
                                                ready_timeout=self.settings.ready_timeout,
                                                handoff_timeout=self.settings.handoff_timeout)
        self.stats.record_fork(snapshot.key, vm.timings)
        self.foreign.setdefault(snapshot.key, snapshot)  # the registry's own are dropped in finish_stats()
        vm.snapshot_manifest["ephemeral"] = True  # a test's vm.snapshot(): gone when the run ends
        self.live.add(vm)
        return vm

    def layer(self, base: Snapshot, setup: Callable[[VM], Any], *, key: str | None, name: str | None,
              label: str) -> Snapshot:
        """The snapshot of ``setup`` run in a fork of ``base``: memoized, from the
        cache, or built now, once across the run's processes (a file lock per
        layer key). With a content ``key`` it outlives the run; without, the run's
        controller removes it when the run ends."""
        lkey = layer_key(base, setup, key=key, run_id=self.run.run_id)
        if lkey in self.layers:
            return self.layers[lkey]
        final = base.dir.parent / lkey
        with FileLock(str(final) + ".build.lock"):
            snap = None
            if final.exists():
                try:
                    private.verify_cache_entry(final, ram_gid=self.run.qemu(self.progress).ram_gid)
                    snap = Snapshot.load(final)
                except (BuildError, private.PrivateDirError) as exc:
                    self.progress(f"vmfork: discarding damaged layer {label} ({lkey}): {exc}")
                    shutil.rmtree(final, ignore_errors=True)
                else:
                    why = incompatibility(snap.manifest, base.machine.accel)
                    if why:  # a cache from another host: same key, other CPU
                        self.progress(f"vmfork: cached layer {label} does not fit this host ({why}); rebuilding")
                        snap = None
            if snap is None:
                snap = self._build_layer(base, setup, lkey, name or label, label, ephemeral=key is None)
            record_use(snap)  # last use for `vmfork cache`; held from prunes while this process lives
        self.layers[lkey] = snap
        return snap

    def _build_layer(self, base: Snapshot, setup: Callable[[VM], Any], lkey: str, name: str, label: str,
                     *, ephemeral: bool) -> Snapshot:
        self.progress(f"vmfork: building layer {label} ({lkey}) on snapshot {base.key}")
        machine = fork(base, run=self.run, network=self.network(), ready_timeout=self.settings.ready_timeout,
                       handoff_timeout=self.settings.handoff_timeout)
        try:
            setup(machine)
            if machine.state is not VMState.RUNNING:
                raise ConfigError(f"layer {label}: its setup left the VM {machine.state}; leave it running")
            snap = machine.save(name=name, resume=False, key=lkey,
                                extra={"layer": label, "layer_key": lkey, "ephemeral": ephemeral})
        finally:
            machine.close()
        t = machine.timings
        self.progress(f"vmfork: layer {label} saved in {t['snapshot_ms'] / 1000:.1f}s "
                      f"({t['snapshot_bytes'] / 2**20:.0f} MiB on disk, depth {snap.depth})")
        return snap

    def release(self, vm: VM, failed: bool, node: pytest.Item | None = None) -> None:
        self.live.discard(vm)
        self.stats.record_release(vm.forked_from.key, vm.timings)
        keep = failed and self.settings.keep_failed
        if not keep:
            vm.close()
            return
        saved = self._keep_snapshot(vm, node)
        vm.close(keep_files=True)
        kept = base_dir() / "kept" / f"{self.run.run_id}-{vm.name}"
        kept.parent.mkdir(mode=private.PRIVATE_MODE, parents=True, exist_ok=True)
        shutil.move(str(vm.dir), kept)
        for sock in kept.glob("*.sock"):
            sock.unlink()
        files = f"{kept} (console.log = guest console after the restore, qemu.stderr, handles.json)"
        if saved is None:
            self.progress(f"vmfork: kept the files of failed VM {vm.name}: {files}")
            return
        stock = Path.home() / ".cache" / "pytest-vmfork"  # the CLI's default when nothing is set
        cache = "" if self.settings.cache_dir == stock else f" --cache-dir {self.settings.cache_dir}"
        self.progress(
            f"vmfork: kept failed VM {vm.name} of {node.nodeid if node else '?'} as {saved.name!r} "
            f"({saved.dir}); step in with: vmfork exec{cache} {saved.name} -- sh -c '...'  "
            f"(`vmfork kept` lists kept VMs, `vmfork gc --kept` removes them); its files: {files}"
        )

    def _keep_snapshot(self, vm: VM, node: pytest.Item | None) -> Snapshot | None:
        """Save a failed test's running fork as a kept snapshot; None if it cannot be."""
        if vm.state is not VMState.RUNNING or node is None:
            return None
        made = node.stash.get(ITEM_VMS, [])
        index = made.index(vm) if vm in made else 0
        key, name = kept_identity(node.nodeid, index)
        try:
            return vm.save(name=name, resume=False, key=key, extra={
                "ephemeral": False,
                "kept": {"test": node.nodeid, "run_id": self.run.run_id, "vm": vm.name},
            })
        except VMForkError as exc:
            self.progress(f"vmfork: could not save failed VM {vm.name} as a snapshot: {exc}")
            return None

    def close(self) -> None:
        for vm in list(self.live):
            vm.close()
        self.live.clear()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        if self._run_network is not None:
            self._run_network.down()  # the last xdist worker of the run deletes the bridge
        if not hasattr(self.config, "workerinput"):  # the run ends: its own snapshots go
            for entry in run_layers(self.settings.cache_dir / "snapshots", self.run.run_id):
                discard(entry)
        if not hasattr(self.config, "workerinput") or not any(self.run.dir.iterdir()):
            self.run.remove()

    def finish_stats(self) -> RunStats:
        """Complete the run statistics with what is known only at the end: every snapshot
        this process built or forked from, and the warm pools' failures. Idempotent."""
        entries = self.registry.entries()
        known = {e.snapshot.key for e in entries}
        self.stats.pool_errors = [
            f"{p.failures} failed pre-warm(s) of snapshot {p.snapshot.key}"
            f"{' (the pool stopped: forks start cold)' if p.failures >= 3 else ''}; last: {p.last_error}"
            for p in self.pools.values() if p.last_error
        ]
        self.stats.snapshots = [
            self._snapshot_stats(e.snapshot, e.description) for e in entries
        ] + [
            self._snapshot_stats(s, _describe_foreign(s)) for key, s in self.foreign.items() if key not in known
        ]
        return self.stats

    def _snapshot_stats(self, snap: Snapshot, template: str) -> dict[str, Any]:
        return {"key": snap.key, "template": template, "cache_hit": snap.cache_hit, "build_s": snap.build_s,
                "boot_s": snap.boot_s, "restore_ms": self.stats.restore_by_key.get(snap.key, []),
                "depth": snap.depth, "first_result_ms": self.stats.first_result_by_key.get(snap.key, [])}


def _describe_foreign(s: Snapshot) -> str:
    """A snapshot no template of this run names: a layer (vm.snapshot()) or one given to vm_factory."""
    if s.depth:
        label = s.manifest.get("layer") or s.name or "vm.snapshot()"
        return f"layer {label!r}, depth {s.depth}, saved from snapshot {s.parent}"
    return (f"{s.machine.memory_mib} MiB, {s.machine.vcpus} vCPU, "
            f"{len(s.mailboxes)} mailboxes (a Snapshot given to vm_factory)")
