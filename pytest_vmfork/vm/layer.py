"""Layers: save a running fork as a new snapshot that forks like a template's.

A fork's guest RAM is a private copy-on-write mapping of its parent's
``memory.ram``: the pages it changed exist only in its QEMU's memory, so no
file can simply be copied. The fork is paused and migrated, RAM included, into
a pipe that :func:`pytest_vmfork.vm.migstream.split` reads as it comes: the RAM
pages go to the layer's new ``memory.ram`` (sparse, at their offsets), the
rest to ``state.bin``, which is then the same x-ignore-shared device state a
template snapshot has. The layer's forks map the new file privately
(copy-on-write), exactly like template forks.

Why a migration and not a copy of ``/proc/<pid>/mem``: the device state must
be saved by a migration anyway, and a fork's RAM is private, which
x-ignore-shared does not skip, so that migration carries every page whatever
we do. Splitting the one stream costs a single pass over RAM, and RAM and
devices are by construction from the same stopped instant.

The guest memory layout is the parent's, so the mailbox offsets and nonce are
too: per-fork payloads, the network handoff, fresh entropy and the clock work
at any depth. The manifest records the chain (``parent``, ``depth``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_vmfork.errors import ConfigError, RestoreError
from pytest_vmfork.vm import migstream
from pytest_vmfork.vm.snapshot import MANIFEST, Snapshot, entry_files, machine_record, publish, staged_entry
from pytest_vmfork.vm.vmm import QemuProcess

#: Bumped when what a layer's files hold changes (2: saved from NICs without a
#: virtio-net header backend): older cached layers are then not reused.
LAYER_RECIPE = 2
RAM_BLOCK = "ram0"  # the memory-backend id (vmm.MachineSpec.argv)
SAVE_TIMEOUT = 300.0
MAX_NAME = 200
_KEY_RE = re.compile(r"[0-9A-Za-z_]{1,64}")  # gc recognises staging dirs of such keys


def check_name(name: str | None) -> None:
    """ConfigError for a name that cannot label a snapshot (before the VM is touched)."""
    if name is None:
        return
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise ConfigError(
            f"snapshot name {name!r}: use a non-empty printable string of at most {MAX_NAME} characters"
        )


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ConfigError(f"snapshot key {key!r}: use 1 to 64 letters, digits or underscores")


def save_running(
    qemu: QemuProcess,
    parent: Snapshot,
    *,
    run_id: str,
    key: str | None = None,
    name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> tuple[Snapshot, dict[str, Any]]:
    """Save the *stopped* QEMU ``qemu`` (forked from ``parent``) as a new snapshot.

    Stored under ``key`` (default: a random one) next to ``parent`` in the
    cache; an existing entry under that key is replaced atomically. ``extra``
    is merged into the manifest (who made it: a test id, a layer's key).
    Returns the snapshot and the save's timings. The caller resumes the VM.
    """
    check_name(name)
    key = key or secrets.token_hex(12)
    check_key(key)
    snapshots = parent.dir.parent
    final = snapshots / key
    t0 = time.monotonic()
    with FileLock(str(final) + ".lock"):
        with staged_entry(final) as staging:
            stats = _migrate_split(qemu, staging, parent.machine.memory_mib * 1024 * 1024)
            save_ms = (time.monotonic() - t0) * 1000
            manifest = _manifest(parent, key, name, run_id, staging, final, stats, extra or {})
            publish(staging, final, manifest,
                    failure=lambda why: RestoreError(f"snapshot of {qemu.name} failed verification: {why}"))
    snap = Snapshot.load(final, cache_hit=False)
    disk = sum(p.stat().st_blocks * 512 for p in (snap.memory_path, snap.state_path))
    return snap, {
        "snapshot_ms": round((time.monotonic() - t0) * 1000, 2),
        "snapshot_save_ms": round(save_ms, 2),
        "snapshot_bytes": disk,  # on disk: memory.ram is sparse (zero pages are holes)
        "snapshot_stream_bytes": stats.stream_bytes,
    }


def _migrate_split(qemu: QemuProcess, staging: Path, memory_bytes: int) -> migstream.SplitStats:
    """Migrate the stopped QEMU into a pipe; split it into memory.ram and state.bin."""
    fd = os.open(staging / "memory.ram", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    result: dict[str, Any] = {}
    rd, wr = os.pipe()

    def reader() -> None:
        try:
            with os.fdopen(rd, "rb", buffering=1 << 20) as src, open(staging / "state.bin", "wb") as state:
                result["stats"] = migstream.split(src, state, fd, block=RAM_BLOCK, block_size=memory_bytes)
        except BaseException as exc:  # closing the pipe fails QEMU's side too: no hang
            result["error"] = exc

    thread = threading.Thread(target=reader, name=f"vmfork-split-{qemu.name}", daemon=True)
    try:
        try:
            os.ftruncate(fd, memory_bytes)
            thread.start()  # it owns ``rd`` from here
        except BaseException:
            os.close(rd)
            os.close(wr)
            raise
        try:
            qemu.send_fd(wr, "vmfork-layer")
        finally:
            os.close(wr)  # QEMU holds its copy; EOF reaches the reader when QEMU closes it
        qemu.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})  # a local pipe: no throttle
        qemu.cmd("migrate", uri="fd:vmfork-layer")
        try:
            qemu.wait_migration(timeout=SAVE_TIMEOUT)
        except BaseException as exc:
            try:
                qemu.cmd("migrate_cancel")
            except Exception:
                pass
            thread.join(10)
            if "error" in result:  # the reader gave up first (and closed the pipe): its reason
                raise RestoreError(f"saving {qemu.name}: {result['error']}") from exc
            raise
        thread.join(SAVE_TIMEOUT)
        if thread.is_alive():
            raise RestoreError(f"saving {qemu.name}: the stream reader did not finish within {SAVE_TIMEOUT:.0f}s")
        if "error" in result:
            raise RestoreError(f"saving {qemu.name}: {result['error']}") from result["error"]
        return result["stats"]
    finally:
        if thread.is_alive():  # an error above: QEMU closed its end (cancel, exit), the reader ends
            thread.join(10)
        os.close(fd)


def _manifest(
    parent: Snapshot, key: str, name: str | None, run_id: str, staging: Path, final: Path,
    stats: migstream.SplitStats, extra: dict[str, Any],
) -> dict[str, Any]:
    m = parent.machine
    manifest = {
        k: v for k, v in parent.manifest.items()
        if k not in ("key", "run_id", "created", "files", "boot_s", "build_s", "name", "parent", "depth")
    }
    manifest.update(
        key=key,
        name=name,
        run_id=run_id,
        created=time.time(),
        parent=parent.key,
        root=parent.manifest.get("root", parent.key),  # the template snapshot at the chain's start
        depth=int(parent.manifest.get("depth", 0)) + 1,
        machine=machine_record(m, final),  # relative to this entry, like a template snapshot's
        files=entry_files(staging),
        ram_pages=stats.pages,
        boot_s=0.0,
        build_s=0.0,
        **extra,
    )
    return manifest


def layer_key(parent: Snapshot, setup: Any, *, key: str | None, run_id: str) -> str:
    """The cache key of a layer: its parent, its setup function and the caller's
    content ``key`` (cached across runs), or this run's id (rebuilt per run)."""
    who = f"{getattr(setup, '__module__', '?')}.{getattr(setup, '__qualname__', repr(setup))}"
    doc = {"recipe": LAYER_RECIPE, "parent": parent.key, "setup": who,
           **({"key": key} if key is not None else {"run": run_id})}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def discard(snapshot: Snapshot | Path) -> None:
    """Remove a saved snapshot (or a cache entry's directory) from the cache.
    Forks running from it keep their mapping. Never raises for a missing entry."""
    final = snapshot.dir if isinstance(snapshot, Snapshot) else Path(snapshot)
    with FileLock(str(final) + ".lock"):
        if final.exists():
            trash = final.parent / f".trash-{final.name}-{os.getpid()}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)


def run_layers(snapshots: Path, run_id: str) -> list[Path]:
    """The cache entries saved during run ``run_id`` that live only as long as the run."""
    found = []
    for manifest in snapshots.glob(f"*/{MANIFEST}"):
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("ephemeral") and doc.get("run_id") == run_id:
            found.append(manifest.parent)
    return found
