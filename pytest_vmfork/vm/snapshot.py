"""Snapshots: boot a template once, save it, and keep it in a content-keyed cache.

A snapshot is two files plus a manifest:

- ``memory.ram``: guest RAM. The template ran with this file as a *shared*
  memory backend, so RAM never passes through the migration stream
  (``x-ignore-shared``); every fork maps it *privately* (copy-on-write).
- ``state.bin``: device state only (about a megabyte).
- ``manifest.json``: the key, the machine, the mailbox offsets in
  ``memory.ram`` (verified against the marker + nonce), sizes and checksums.

Building takes a lock per key, so parallel xdist workers and concurrent runs
build a missing snapshot once; it is assembled in a staging directory and
renamed into place, so a crash never leaves a half snapshot under the key.
The template is shut down right after the save and never runs again: a
private mapping would otherwise see its later writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.build import image as image_mod
from pytest_vmfork.errors import BuildError, ConfigError, VMForkError
from pytest_vmfork.host import cache, private
from pytest_vmfork.host.confine import Handoff
from pytest_vmfork.host.run import Run
from pytest_vmfork.vm.template import Template
from pytest_vmfork.vm.vmm import MachineSpec, QemuProcess, cpu_fingerprint, machine_type, qemu_version

Progress = Callable[[str], None]
MANIFEST = "manifest.json"
TEMPLATE_MAC = "52:54:00:00:00:01"


@dataclass(frozen=True)
class Snapshot:
    """A saved, healthy template, ready to fork. Plain data; safe to share."""

    key: str
    dir: Path
    machine: MachineSpec
    nonce: bytes
    offsets: dict[str, int]  # mailbox name -> offset in memory.ram (system one included)
    mailboxes: tuple[str, ...]  # the user mailboxes this snapshot offers
    guest_acked: tuple[str, ...]  # mailboxes a guest program acks (vmfork-ack), not the agent
    manifest: dict[str, Any]
    cache_hit: bool = False
    build_s: float = 0.0
    boot_s: float = 0.0

    @property
    def memory_path(self) -> Path:
        return self.dir / "memory.ram"

    @property
    def state_path(self) -> Path:
        return self.dir / "state.bin"

    @property
    def parent(self) -> str | None:
        """The key of the snapshot this one was saved from (``vm.snapshot()``); None for a template's."""
        return self.manifest.get("parent")

    @property
    def depth(self) -> int:
        """0 for a template's snapshot, 1 for a snapshot of its fork, and so on."""
        return int(self.manifest.get("depth", 0))

    @property
    def name(self) -> str | None:
        return self.manifest.get("name")

    @classmethod
    def load(cls, directory: Path, *, cache_hit: bool = True) -> "Snapshot":
        """Load and verify a saved snapshot; raise BuildError if it is damaged."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise BuildError(f"snapshot {directory} has no readable manifest: {exc}") from exc
        problems = verify_files(directory, manifest)
        if problems:
            raise BuildError(f"snapshot {directory} is damaged: {'; '.join(problems)}")
        machine = machine_from_record(directory, manifest["machine"])
        return cls(
            key=manifest["key"],
            dir=directory,
            machine=machine,
            nonce=bytes.fromhex(manifest["nonce"]),
            offsets={k: int(v) for k, v in manifest["offsets"].items()},
            mailboxes=tuple(manifest["mailboxes"]),
            guest_acked=tuple(manifest.get("guest_acked", ())),
            manifest=manifest,
            cache_hit=cache_hit,
            build_s=float(manifest.get("build_s", 0.0)),
            boot_s=float(manifest.get("boot_s", 0.0)),
        )


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's content (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(directory: Path, manifest: dict[str, Any], *, memory_dir: Path | None = None) -> list[str]:
    """Cheap integrity checks: sizes, the device state's checksum, mailbox markers, image files.

    ``memory_dir`` holds the entry's own files when they are still staged elsewhere
    (paths in the manifest stay relative to ``directory``, the final entry)."""
    problems = []
    own = memory_dir or directory
    for name, meta in manifest.get("files", {}).items():
        path = own / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if size != meta["size"]:
            problems.append(f"{name} is {size} bytes, manifest says {meta['size']}")
        elif "sha256" in meta and file_sha256(path) != meta["sha256"]:
            problems.append(f"{name} checksum mismatch")
    if not problems:
        nonce = bytes.fromhex(manifest["nonce"])
        with open(own / "memory.ram", "rb") as f:
            for name, off in manifest["offsets"].items():
                f.seek(int(off))
                if f.read(len(mbx.marker(name, nonce, mbx.PAGE_SIZE))) != mbx.marker(name, nonce, mbx.PAGE_SIZE):
                    problems.append(f"mailbox {name!r} marker not found at offset {off}")
    for part in ("kernel", "initrd", "rootfs", "modules"):
        rel = manifest["machine"].get(part)
        if rel is None and part == "modules":
            continue  # a user's kernel without a module tree
        if os.path.isabs(rel):
            problems.append(f"{part} path {rel} is absolute (made by an older pytest-vmfork)")
        elif not entry_path(directory, rel).exists():
            problems.append(f"image file {rel} is missing")
    return problems


def machine_record(machine: MachineSpec, entry: Path) -> dict[str, Any]:
    """``machine`` for a manifest, its files relative to ``entry``: a copied or restored
    cache still resolves."""
    files = {part: os.path.relpath(getattr(machine, part), entry) for part in ("kernel", "initrd", "rootfs")}
    return {**files, "modules": None if machine.modules is None else os.path.relpath(machine.modules, entry),
            "cmdline": machine.cmdline, "memory_mib": machine.memory_mib, "vcpus": machine.vcpus,
            "accel": machine.accel}


def machine_from_record(directory: Path, m: dict[str, Any]) -> MachineSpec:
    """The inverse of :func:`machine_record` for the entry at ``directory``."""
    return MachineSpec(
        kernel=entry_path(directory, m["kernel"]),
        initrd=entry_path(directory, m["initrd"]),
        rootfs=entry_path(directory, m["rootfs"]),
        modules=None if m.get("modules") is None else entry_path(directory, m["modules"]),
        cmdline=m["cmdline"],
        memory_mib=m["memory_mib"],
        vcpus=m["vcpus"],
        accel=m["accel"],
    )


@contextlib.contextmanager
def staged_entry(final: Path) -> Iterator[Path]:
    """A fresh staging directory next to the cache entry ``final`` (its name is one
    gc recognises), removed if the block fails: a crash never leaves half an entry
    under the key. The block ends with :func:`publish`. The caller holds the key's lock."""
    staging = final.parent / f".staging-{final.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def entry_files(staging: Path) -> dict[str, dict[str, Any]]:
    """The manifest's ``files`` of a staged entry: sizes, and the device state's checksum
    (memory.ram is too large to hash on every load; its mailbox markers are checked)."""
    state = staging / "state.bin"
    return {
        "state.bin": {"size": state.stat().st_size, "sha256": file_sha256(state)},
        "memory.ram": {"size": (staging / "memory.ram").stat().st_size},
    }


def publish(staging: Path, final: Path, manifest: dict[str, Any], *,
            failure: Callable[[str], VMForkError]) -> None:
    """Verify the staged entry against ``manifest`` (``failure(problems)`` is raised if
    it does not match), write the manifest, seal the entry and rename it into place
    (an old entry under the key is moved aside first; forks running from it keep
    their files). The caller holds the key's lock."""
    problems = verify_files(final, manifest, memory_dir=staging)
    if problems:
        raise failure("; ".join(problems))
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    private.seal(staging)
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{os.getpid()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(staging, final)


def ignore_shared(qemu: QemuProcess) -> None:
    """Migrate device state only: guest RAM stays in (or comes from) the memory file
    (``x-ignore-shared``), with migration events on (a save and a restore wait on them)."""
    qemu.cmd(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": True},
                      {"capability": "events", "state": True}],
    )


def entry_path(directory: Path, rel: str) -> Path:
    """A manifest path, relative to its cache entry, as a path on this host."""
    return Path(os.path.normpath(directory / rel))


def incompatibility(manifest: dict[str, Any], accel: str) -> str:
    """Why a (verified) cached snapshot cannot be restored by this host's QEMU, or "".

    The device state is only loadable by the QEMU version and machine type that
    saved it; under KVM the guest also saw this host's CPU model. A cache restored
    from another machine or copied from another user is checked here, so a mismatch
    is a rebuild with a reason, never a failed restore.
    """
    here = {"qemu": qemu_version(), "machine_type": machine_type(), "cpu": cpu_fingerprint(accel)}
    for field_, now in here.items():
        then = manifest.get(field_)
        if then != now:
            return f"made with {field_} {then or '(not recorded)'}, this host has {now}"
    return ""


def ram_offset(gpa: int, memory_bytes: int) -> int:
    """Map a guest-physical address to its offset in the RAM file (q35 layout).

    q35 puts RAM below the PCI hole up to 2 GiB (or 2.75 GiB when it all fits),
    and the rest above 4 GiB; the backend file holds low RAM then high RAM.
    """
    lowmem = 0x80000000 if memory_bytes >= 0xB0000000 else 0xB0000000
    below = min(memory_bytes, lowmem)
    if gpa < below:
        return gpa
    if gpa >= 1 << 32 and gpa - (1 << 32) < memory_bytes - below:
        return below + gpa - (1 << 32)
    raise BuildError(f"guest-physical address {gpa:#x} is outside guest RAM")


@dataclass
class SnapshotStore:
    """The snapshot cache under ``<cache_dir>/snapshots``."""

    cache_dir: Path
    accel: str = "tcg"
    progress: Progress = field(default=lambda msg: None)
    build: image_mod.BuildOptions = field(default_factory=image_mod.BuildOptions)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()  # a str from os.environ works too

    def key_for(self, template: Template) -> str:
        return template.snapshot_key(accel=self.accel, qemu_version=qemu_version())

    def path_for(self, key: str) -> Path:
        return self.cache_dir / "snapshots" / key

    def get(self, template: Template, *, run: Run, rebuild: bool = False) -> Snapshot:
        """The template's snapshot: from the cache, or built now (once per key).

        ``rebuild`` boots the template again even if a snapshot is cached, but
        only once per run: a later caller with the same ``run.run_id`` (an
        xdist worker) reuses what the first one rebuilt.
        """
        key = self.key_for(template)
        final = self.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(final) + ".lock"):
            if final.exists():
                try:
                    private.verify_cache_entry(final, ram_gid=run.qemu(self.progress).ram_gid)
                    snap = Snapshot.load(final)
                except (BuildError, private.PrivateDirError) as exc:
                    self.progress(f"vmfork: discarding damaged snapshot {key}: {exc}")
                    shutil.rmtree(final, ignore_errors=True)
                else:
                    why = incompatibility(snap.manifest, self.accel)
                    if why:
                        self.progress(f"vmfork: cached snapshot {key} does not fit this host ({why}); rebuilding")
                    elif not rebuild or snap.manifest.get("run_id") == run.run_id:
                        if record_use(snap):
                            return snap
                        self.progress(f"vmfork: the image of cached snapshot {key} was pruned just now; rebuilding")
            snap = self._build(template, key, final, run)
            record_use(snap)
            return snap

    def _build(self, template: Template, key: str, final: Path, run: Run) -> Snapshot:
        t0 = time.monotonic()
        img = image_mod.build_image(template.image_spec(), self.cache_dir, progress=self.progress,
                                    options=self.build)
        if not cache.record_use(img.dir):
            self.progress(f"vmfork: image {img.key[:12]} was pruned just now; building it again")
            img = image_mod.build_image(template.image_spec(), self.cache_dir, progress=self.progress,
                                        options=self.build)
            cache.record_use(img.dir)
        if template.modules:  # before any boot: a name the kernel lacks is the template's error
            if img.modules is None:
                raise ConfigError(f"Template modules={list(template.modules)}: kernel {template.kernel} has no "
                                  "module tree; pass kernel_modules= (its make modules_install tree)")
            img.modules.require(template.modules)
        with staged_entry(final) as staging:
            manifest, name = self._boot_and_save(template, img, key, staging, final, run, t0)
            publish(staging, final, manifest,
                    failure=lambda why: BuildError(f"template {name}: snapshot failed verification: {why}"))
        snap = Snapshot.load(final, cache_hit=False)
        self.progress(
            f"vmfork: snapshot {key} ready (template boot {snap.boot_s:.1f}s, total {snap.build_s:.1f}s)"
        )
        return snap

    def _boot_and_save(
        self, template: Template, img: Any, key: str, staging: Path, final_dir: Path, run: Run, t0: float
    ) -> tuple[dict[str, Any], str]:
        """Boot the template, warm it up, save its device state; (its manifest, the
        template VM's name)."""
        machine = MachineSpec(
            kernel=img.kernel,
            initrd=img.initrd,
            rootfs=img.rootfs,
            modules=None if img.modules is None else img.modules.image,
            cmdline=template.kernel_cmdline(),
            memory_mib=template.memory_mib,
            vcpus=template.vcpus,
            accel=self.accel,
        )
        mem_path = staging / "memory.ram"
        name, workdir = run.new_vm_dir("t")
        handoff = Handoff(run.qemu(self.progress))
        try:
            argv = machine.argv(
                handoff=handoff,
                workdir=workdir,
                mem_path=mem_path,
                shared=True,
                incoming=False,
                netdev=["type=hubport", "hubid=0"],
                mac=TEMPLATE_MAC,
                name=name,
            )
        except BaseException:
            handoff.close()
            raise
        self.progress(f"vmfork: booting template {name} ({template.memory_mib} MiB, {self.accel})")
        qemu = QemuProcess.start(argv, workdir, name, handoff=handoff)
        try:
            t_boot = time.monotonic()
            ready = qemu.expect_event(lambda f: f.get("event") == "ready")
            try:
                qemu.wait_event(ready, template.boot_timeout)
            except (TimeoutError, EOFError) as exc:
                why = "exited" if not qemu.alive() else f"was not ready within {template.boot_timeout:.0f}s"
                raise BuildError(
                    f"template {name}: guest agent {why}", console_tail=qemu.console_tail()
                ) from exc
            boot_s = time.monotonic() - t_boot
            self.progress(f"vmfork: template agent ready after {boot_s:.1f}s")
            agent = qemu.agent
            agent.health(timeout=30)
            if template.modules:  # loaded in the snapshot: forks pay nothing for them
                self.progress(f"vmfork: loading kernel modules {' '.join(template.modules)}")
                res = agent.exec(["modprobe", "-a", *template.modules], timeout=template.warmup_timeout)
                if res.returncode != 0:
                    raise BuildError(f"template modules {list(template.modules)}: modprobe exited with "
                                     f"{res.returncode}: {res.stderr[-2000:]!r}", console_tail=qemu.console_tail())
            for argv_w in template.warmup:
                self.progress(f"vmfork: warm-up: {' '.join(argv_w)}")
                res = agent.exec(list(argv_w), timeout=template.warmup_timeout)
                if res.returncode != 0:
                    raise BuildError(
                        f"template warm-up command {list(argv_w)} exited with {res.returncode}; "
                        f"fix the command in your Template.\nstdout: {res.stdout[-2000:]!r}\n"
                        f"stderr: {res.stderr[-2000:]!r}"
                    )
            desc = agent.describe()
            memory_bytes = template.memory_mib * 1024 * 1024
            offsets = {m.name: ram_offset(m.guest_phys_addr, memory_bytes) for m in desc.mailboxes}
            # Device state only: RAM stays in the shared file (x-ignore-shared).
            qemu.cmd("stop")
            ignore_shared(qemu)
            qemu.migrate_to_file(staging / "state.bin")
            qemu.wait_migration(timeout=120)
        except VMForkError as exc:
            if isinstance(exc, BuildError):
                raise
            raise BuildError(f"template {name}: {exc}", console_tail=qemu.console_tail()) from exc
        finally:
            qemu.quit()  # the template must never run again
            shutil.rmtree(workdir, ignore_errors=True)
        manifest: dict[str, Any] = {
            "key": key,
            "run_id": run.run_id,
            "created": time.time(),
            "machine": machine_record(machine, final_dir),
            "image_key": img.key,
            "description": template.describe(),  # for `vmfork cache`
            "qemu": qemu_version(),
            "machine_type": machine_type(),
            "cpu": cpu_fingerprint(self.accel),
            "agent_version": desc.agent_version,
            "kernel_release": desc.kernel_release,
            "nonce": desc.nonce.hex(),
            "offsets": offsets,
            "mailboxes": list(template.mailboxes),
            "guest_acked": list(template.guest_acked_mailboxes),
            "files": entry_files(staging),
            "boot_s": round(boot_s, 3),
            "build_s": round(time.monotonic() - t0, 3),
        }
        return manifest, name


def record_use(snapshot: Snapshot) -> bool:
    """Record a use of ``snapshot`` and of the image it boots from, and keep both
    from being pruned while this process lives (:func:`pytest_vmfork.host.cache.record_use`).
    False if a prune removed either just now: the caller rebuilds."""
    if not cache.record_use(snapshot.dir):
        return False
    image_key = snapshot.manifest.get("image_key")
    if not image_key:
        return True
    return cache.record_use(snapshot.dir.parent.parent / "images" / str(image_key))


def require_mailboxes(snapshot: Snapshot, names: list[str]) -> None:
    """ConfigError naming the unknown mailbox and what the snapshot offers."""
    for name in names:
        if name not in snapshot.mailboxes:
            offers = ", ".join(snapshot.mailboxes) or "(none; declare them with Template(mailboxes=[...]))"
            raise ConfigError(f"unknown mailbox {name!r}; this snapshot offers: {offers}")
