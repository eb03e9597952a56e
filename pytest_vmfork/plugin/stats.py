"""Run statistics: what the ``vmfork summary`` at the end of a run reports.

One object per pytest process, on ``config.stash`` (the plugin's ``STATS_KEY``), not
attributes set on pytest's Config. The session records into it as forks are made and
released; an xdist worker sends its :meth:`RunStats.export` to the controller through
``workeroutput``, which adds it with :meth:`RunStats.add_worker`; the controller's
:meth:`RunStats.summary_lines` merges its own and every worker's figures. Pure data and
text: no pytest, no VM, so the summary's arithmetic is unit-tested on its own.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunStats:
    """Counters and timings of one process's forks (and, on the controller, its workers')."""

    forks: int = 0
    #: forks that came pre-warmed from the warm pool
    prewarmed: int = 0
    restore_ms: list[float] = field(default_factory=list)
    restore_by_key: dict[str, list[float]] = field(default_factory=dict)
    #: per fork whose test ran a command: fork + first exec, what the test waited for its first result
    first_result_ms: list[float] = field(default_factory=list)
    first_result_by_key: dict[str, list[float]] = field(default_factory=dict)
    first_exec_ms: list[float] = field(default_factory=list)
    #: how each fork's network handoff completed: "ack" or "ctl-fallback"
    handoff_paths: dict[str, int] = field(default_factory=dict)
    #: progress lines; a worker cannot print them, so the controller repeats them once each
    messages: list[str] = field(default_factory=list)
    #: set by the session when the run ends: one entry per snapshot forked from or built
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    pool_errors: list[str] = field(default_factory=list)
    #: what xdist workers exported (controller only)
    workers: list[dict[str, Any]] = field(default_factory=list)

    def record_fork(self, key: str, timings: dict[str, Any]) -> None:
        """A fork of snapshot ``key`` is running (``timings`` is its ``vm.timings``)."""
        self.forks += 1
        self.restore_ms.append(timings["restore_to_healthy_ms"])
        self.restore_by_key.setdefault(key, []).append(timings["restore_to_healthy_ms"])
        self.prewarmed += bool(timings.get("prewarmed"))
        path = timings.get("handoff_path")
        if path:
            self.handoff_paths[path] = self.handoff_paths.get(path, 0) + 1

    def record_release(self, key: str, timings: dict[str, Any]) -> None:
        """A test released its fork: count its first command, if it ran one."""
        if "first_exec_ms" in timings and "restore_to_healthy_ms" in timings:
            self.first_exec_ms.append(timings["first_exec_ms"])
            total = round(timings["restore_to_healthy_ms"] + timings["first_exec_ms"], 2)
            self.first_result_ms.append(total)
            self.first_result_by_key.setdefault(key, []).append(total)

    def export(self) -> dict[str, Any]:
        """This process's figures as plain data, for an xdist worker's ``workeroutput``."""
        return {
            "forks": self.forks, "restore_ms": self.restore_ms, "first_result_ms": self.first_result_ms,
            "first_exec_ms": self.first_exec_ms, "prewarmed": self.prewarmed, "pool_errors": self.pool_errors,
            "handoff_paths": self.handoff_paths, "messages": self.messages, "snapshots": self.snapshots,
        }

    def add_worker(self, exported: dict[str, Any]) -> None:
        """Take a worker's :meth:`export` into this (the controller's) summary."""
        self.workers.append(exported)

    def totals(self) -> dict[str, Any]:
        """This process's figures plus every worker's."""
        own = self.export()
        merged = {**own, "restore_ms": list(own["restore_ms"]), "snapshots": list(own["snapshots"]),
                  "handoff_paths": dict(own["handoff_paths"])}
        for key in ("first_result_ms", "first_exec_ms", "pool_errors"):
            merged[key] = list(own[key])
        for worker in self.workers:
            merged["forks"] += worker["forks"]
            merged["restore_ms"] += worker["restore_ms"]
            merged["snapshots"] += worker["snapshots"]
            for key in ("first_result_ms", "first_exec_ms", "pool_errors"):
                merged[key] += worker.get(key, [])
            merged["prewarmed"] += worker.get("prewarmed", 0)
            for path, n in worker.get("handoff_paths", {}).items():
                merged["handoff_paths"][path] = merged["handoff_paths"].get(path, 0) + n
        return merged

    def summary_lines(self) -> list[str]:
        """The ``vmfork summary`` section's lines; empty when the run forked and built nothing."""
        stats = self.totals()
        worker_messages = [m for w in self.workers for m in w.get("messages", [])]
        if not stats["forks"] and not stats["snapshots"] and not worker_messages:
            return []
        out = list(dict.fromkeys(worker_messages))  # what workers could not print, once each
        snapshots = merge_snapshot_stats(stats["snapshots"])
        for snap in snapshots:
            out += _snapshot_lines(snap)
        if stats["restore_ms"]:
            out += _fork_lines(stats, snapshots)
        return out


def _snapshot_lines(snap: dict[str, Any]) -> list[str]:
    if snap.get("depth"):
        out = [f"snapshot {snap['key']}: " + ("cache hit" if snap["cache_hit"] else "saved in this run")]
    elif snap["cache_hit"]:
        out = [f"snapshot {snap['key']}: cache hit (no template boot)"]
    else:
        again = f"; booted by {snap['builds']} processes" if snap["builds"] > 1 else ""
        out = [f"snapshot {snap['key']}: built in {snap['build_s']:.1f}s "
               f"(template cold boot {snap['boot_s']:.1f}s){again}"]
    out.append(f"  template: {snap.get('template') or '?'}")
    if snap["restore_ms"]:
        p50, p95, _ = percentiles(snap["restore_ms"])
        out.append(f"  {len(snap['restore_ms'])} forks, restore-to-healthy p50 {p50:.0f} ms, p95 {p95:.0f} ms")
        if snap.get("first_result_ms"):
            f50, f95, _ = percentiles(snap["first_result_ms"])
            out.append(f"  fork + first exec p50 {f50:.0f} ms, p95 {f95:.0f} ms "
                       f"({len(snap['first_result_ms'])} forks ran a command)")
    else:
        out.append("  no forks")
    return out


def _fork_lines(stats: dict[str, Any], snapshots: list[dict[str, Any]]) -> list[str]:
    p50, p95, top = percentiles(stats["restore_ms"])
    out = [f"forks: {len(stats['restore_ms'])}  restore-to-healthy p50 {p50:.0f} ms  p95 {p95:.0f} ms  "
           f"max {top:.0f} ms"]
    first = stats["first_result_ms"]
    if first:  # what a test waits for its first result: the fork, then its first command
        f50, f95, ftop = percentiles(first)
        e50 = statistics.median(stats["first_exec_ms"])
        out.append(f"fork + first exec ({len(first)} forks ran a command): p50 {f50:.0f} ms  p95 {f95:.0f} ms  "
                   f"max {ftop:.0f} ms  (first exec alone p50 {e50:.0f} ms)")
    if stats["prewarmed"] or stats["pool_errors"]:
        out.append(f"warm pool: {stats['prewarmed']} of {stats['forks']} forks came pre-warmed, "
                   f"{stats['forks'] - stats['prewarmed']} forked cold")
    out += [f"warm pool: {error}" for error in dict.fromkeys(stats["pool_errors"])]
    paths = stats["handoff_paths"]
    if paths:
        fallback = paths.get("ctl-fallback", 0)
        out.append(f"network handoff: {paths.get('ack', 0)} by guest ack, {fallback} by the control channel's "
                   "fallback" + ("  <-- the guest's UDP ack did not arrive in time; see vm.timings" if fallback else ""))
    boot = [s["boot_s"] for s in snapshots if s["boot_s"]]
    if boot:
        line = f"cold boot / fork restore (p50): {max(boot) * 1000 / p50:.0f}x"
        if first:
            line += f"; cold boot / fork + first exec (p50): {max(boot) * 1000 / f50:.0f}x"
        out.append(line)
    return out


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    """p50, p95 (nearest rank) and max of a non-empty list."""
    ms = sorted(ms)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], ms[-1]


def merge_snapshot_stats(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per snapshot key from every process's reports (xdist workers):
    forks pooled, and built if any process built it (the others then waited
    on its lock and loaded it); ``builds`` counts the processes that booted it."""
    merged: dict[str, dict[str, Any]] = {}
    for snap in reports:
        built = not snap["cache_hit"]
        have = merged.get(snap["key"])
        if have is None:
            merged[snap["key"]] = {**snap, "restore_ms": list(snap.get("restore_ms", [])),
                                   "first_result_ms": list(snap.get("first_result_ms", [])), "builds": int(built)}
            continue
        have["restore_ms"] += snap.get("restore_ms", [])
        have["first_result_ms"] += snap.get("first_result_ms", [])
        have["builds"] += built
        if built and have["cache_hit"]:
            have.update(cache_hit=False, build_s=snap["build_s"], boot_s=snap["boot_s"])
    return sorted(merged.values(), key=lambda s: (s["cache_hit"], s["key"]))
