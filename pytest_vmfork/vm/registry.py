"""Templates to snapshots: which snapshot a template forks from, resolved once.

A run may use several templates (one per test directory, module or class).
:class:`SnapshotRegistry` maps each to its snapshot through the
:class:`~pytest_vmfork.vm.snapshot.SnapshotStore`, memoized by the template's
content, so a template that many tests name is looked up (and, if missing,
booted) once per process; the store's per-key file lock makes that once per
run across xdist workers and concurrent runs. One :class:`Snapshot` object
stands for each key, which is what warm pools compare forks against.

:func:`snapshot_for` is the same lookup for a script, without pytest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pytest_vmfork.build.image import BuildOptions
from pytest_vmfork.config import ACCELS, default_cache_dir
from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host.run import Run
from pytest_vmfork.vm.accel import resolve_accel
from pytest_vmfork.vm.snapshot import Snapshot, SnapshotStore
from pytest_vmfork.vm.template import Template

Progress = Callable[[str], None]


def content_id(template: Template) -> str:
    """A hash of every field of ``template``: equal recipes share one id.

    Cheap on purpose (no QEMU query, no hashing of the project sources like the
    snapshot key): it is computed for every test whose template is function-scoped.
    """
    doc = {}
    for f in dataclasses.fields(template):
        value = getattr(template, f.name)
        if f.name == "files":
            value = {path: hashlib.sha256(data).hexdigest() for path, data in value.items()}
        doc[f.name] = value
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=_jsonable).encode()).hexdigest()


def _jsonable(value: object) -> object:
    """A Path (kernel=) by its name: its content is hashed in the snapshot key."""
    return str(value) if isinstance(value, Path) else list(value)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Entry:
    """A snapshot the registry handed out, with what it was built from."""

    snapshot: Snapshot
    template: Template

    @property
    def description(self) -> str:
        return self.template.describe()


class SnapshotRegistry:
    """One run's (or one process's) template -> snapshot map. Thread-safe."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        run: Run,
        accel: str = "auto",
        rebuild: bool = False,
        progress: Progress | None = None,
        build: BuildOptions | None = None,
        verbose: bool = False,
    ) -> None:
        if accel not in ACCELS:
            raise ConfigError(f"accel={accel!r} is not one of {', '.join(ACCELS)}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.run = run
        self.accel = accel
        self.rebuild = rebuild
        self.progress: Progress = progress or (lambda message: None)
        self.build = build or BuildOptions()
        self.verbose = verbose  # repeat a cached accelerator verdict (-v)
        self._by_content: dict[str, Snapshot] = {}
        self._by_key: dict[str, Entry] = {}
        self._lock = threading.Lock()  # one lookup at a time: a build must not run twice

    def get(self, template: Template) -> Snapshot:
        """The snapshot ``template`` forks from: from the cache, or booted now (once)."""
        if not isinstance(template, Template):
            raise ConfigError(
                f"vmfork_template must return a pytest_vmfork.Template, got {type(template).__name__}"
            )
        cid = content_id(template)
        with self._lock:
            known = self._by_content.get(cid)
            if known is not None:
                return known
            store = SnapshotStore(
                self.cache_dir,
                accel=resolve_accel(self.accel, self.cache_dir, template, self.progress, self.build,
                                    verbose=self.verbose),
                progress=self.progress,
                build=self.build,
            )
            snap = store.get(template, run=self.run, rebuild=self.rebuild)
            # Recipes that differ only in what does not shape the guest (timeouts)
            # share a key: keep the first object, so warm pools recognise it.
            entry = self._by_key.setdefault(snap.key, Entry(snap, template))
            self._by_content[cid] = entry.snapshot
            return entry.snapshot

    def entries(self) -> list[Entry]:
        """Every snapshot handed out so far, in first-use order."""
        with self._lock:
            return list(self._by_key.values())


def snapshot_for(
    template: Template,
    *,
    cache_dir: Path | str | None = None,
    run: Run | None = None,
    accel: str = "auto",
    rebuild: bool = False,
    progress: Progress | None = None,
    build: BuildOptions | None = None,
) -> Snapshot:
    """The snapshot ``template`` forks from, without pytest: from the cache
    (``cache_dir``, default ``$VMFORK_CACHE_DIR`` or ``~/.cache/pytest-vmfork``),
    or built now under the store's lock (once, however many processes ask).

    ``run`` is where the template boots; without one a private run directory
    is used and removed again. ``rebuild`` boots the template even if its
    snapshot is cached (once per ``run.run_id``). ``build`` says how a missing
    image is built (apt sources, mmdebstrap mode; default: the host's sources, auto).
    """
    own_run = run is None
    active = Run() if run is None else run
    try:
        registry = SnapshotRegistry(
            default_cache_dir() if cache_dir is None else Path(cache_dir),
            run=active,
            accel=accel,
            rebuild=rebuild,
            progress=progress,
            build=build,
        )
        return registry.get(template)
    finally:
        if own_run:
            active.remove()
