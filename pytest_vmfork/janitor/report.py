"""What a sweep found: each thing removed (or, in a dry run, that would be), skipped
or left alone because its run lives, and the one-line and full summaries ``vmfork gc``
and the session-start pass print. Sweeps nothing itself; every sweep writes here."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GcItem:
    """One thing gc removed (or would remove, or skipped): what, which, why."""

    kind: str  # vmm, vm-dir, run-dir, kept, subnet-lease, reclaim, bridge, run-leases, tap, ...
    name: str
    reason: str


@dataclass
class GcReport:
    """What :func:`pytest_vmfork.janitor.gc.collect` removed, would remove (``dry_run``) or skipped."""

    dry_run: bool = False
    removed: list[GcItem] = field(default_factory=list)
    skipped: list[GcItem] = field(default_factory=list)
    live_runs: list[str] = field(default_factory=list)  # left alone: their owner lives
    elapsed_s: float = 0.0

    def remove(self, kind: str, name: object, reason: str) -> None:
        self.removed.append(GcItem(kind, str(name), reason))

    def skip(self, kind: str, name: object, reason: str) -> None:
        self.skipped.append(GcItem(kind, str(name), reason))

    def reported(self, kind: str) -> set[str]:
        """The names of every ``kind`` item removed or skipped so far."""
        return {i.name for i in self.removed + self.skipped if i.kind == kind}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for item in self.removed:
            out[item.kind] = out.get(item.kind, 0) + 1
        return out

    def summary(self) -> str:
        """One line: ``3 run-dir, 1 bridge`` (or ``nothing``)."""
        counts = self.counts()
        return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "nothing"

    def format(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{verb} {i.kind} {i.name}: {i.reason}" for i in self.removed]
        lines += [f"skipped {i.kind} {i.name}: {i.reason}" for i in self.skipped]
        tail = f"vmfork gc: {verb} {self.summary()}"
        if self.skipped:
            tail += f"; skipped {len(self.skipped)}"
        if self.live_runs:
            tail += f"; {len(self.live_runs)} live run(s) left alone"
        lines.append(tail + f" ({self.elapsed_s * 1000:.0f} ms)")
        return "\n".join(lines)
