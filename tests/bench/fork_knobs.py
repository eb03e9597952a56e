"""Memory and speed of forks under QEMU host-side knobs (docs/performance.md, issue #12).

    python -m tests.bench.fork_knobs [--blocks 3] [--forks 10] [--concurrent 20] CONFIG...

A CONFIG is ``NAME`` or ``NAME:tb=MIB:env=KEY=VALUE,KEY=VALUE:cpu=MODEL`` (``tb``:
the TCG translation buffer, default this checkout's ``vmm.TCG_TB_SIZE_MIB``, 0 for
QEMU's own 1 GiB; ``env`` goes into QEMU's environment, e.g. glibc's ``MALLOC_*``;
``cpu`` replaces ``-cpu max``, which the guest sees: such a config boots a
template of its own in a scratch cache that links the plugin's guest images), e.g.
``qemu:tb=0`` ``tb64:tb=64`` ``arena1:tb=0:env=MALLOC_ARENA_MAX=1`` ``nehalem:cpu=Nehalem``.
Every config runs once per block, in a rotated order, so a noisy shared machine
weighs on all of them alike: per block and config, ``--forks`` plain library forks (no network,
no pool), each timed to healthy and through its first ``vm.exec(["true"])``
(``fork_ab.py``'s figures) with the TCG statistics (HMP ``info jit``) after that
exec, then ``--concurrent`` forks alive at once, each ready and past one exec,
with the PSS of each mapping class (tests/bench/forkmem.py). Prints one JSON line
per block and config, then a summary line per config (medians over blocks).
The stock template of ``SnapshotStore(CACHE)`` (``--cache``, default the
plugin's cache) is used, so every config without ``cpu`` restores one snapshot,
whatever tb-size and environment it was taken with.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from pytest_vmfork import Run, SnapshotStore, Template, fork
from pytest_vmfork.vm import vmm

from . import forkmem
from .fork_ab import timed_fork

STOCK_TB_SIZE = vmm.TCG_TB_SIZE_MIB
STOCK_ARGV = vmm.MachineSpec.argv
_set_env: set[str] = set()

def parse_config(text: str) -> dict[str, Any]:
    name, *parts = text.split(":")
    cfg: dict[str, Any] = {"name": name, "tb": STOCK_TB_SIZE, "env": {}, "cpu": None}
    for part in parts:
        key, _, value = part.partition("=")
        if key == "tb":
            cfg["tb"] = int(value)
        elif key == "env":
            cfg["env"] = dict(kv.split("=", 1) for kv in value.split(","))
        elif key == "cpu":
            cfg["cpu"] = value
        else:
            raise SystemExit(f"{text!r}: unknown part {part!r} (use tb=MIB, env=KEY=VALUE,... or cpu=MODEL)")
    return cfg


def timed_forks(snap: Any, run: Run, n: int) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        ready, first, total, jit = timed_fork(snap, run, forkmem.tcg_stats)
        rows.append({"restore_ms": ready, "first_exec_ms": first, "fork_first_exec_ms": total, **jit})
    return rows


def concurrent_memory(snap: Any, run: Run, n: int) -> dict[str, Any]:
    vms = []
    try:
        for _ in range(n):
            vm = fork(snap, run=run)
            vms.append(vm)
            vm.exec(["true"])
        per = [forkmem.breakdown(vm.pid, snap.memory_path) for vm in vms]
        total = sum(sum(c["pss"] for c in b.values()) for b in per)
        jits = [forkmem.tcg_stats(vm) for vm in vms]
        return {"pss_per_fork_mib": round(total / n / 1024, 1), "classes": forkmem.per_fork_mib(per),
                "code_mib_median": round(statistics.median(j["code_bytes"] for j in jits) / 2**20, 1),
                "flushes_max": max(j["flushes"] for j in jits)}
    finally:
        for vm in vms:
            vm.close()




def apply(cfg: dict[str, Any] | None) -> None:
    """Make the next forks' QEMU use ``cfg`` (None: this checkout's own settings).
    QEMU inherits our environment: ``env`` is set here, and unset again."""
    cfg = cfg or {"tb": STOCK_TB_SIZE, "env": {}, "cpu": None}
    vmm.TCG_TB_SIZE_MIB = cfg["tb"]
    for key in _set_env - set(cfg["env"]):
        os.environ.pop(key, None)
    os.environ.update(cfg["env"])
    _set_env.clear()
    _set_env.update(cfg["env"])
    cpu = cfg["cpu"]

    def argv(self: vmm.MachineSpec, **kw: Any) -> list[str]:
        out = STOCK_ARGV(self, **kw)
        out[out.index("-cpu") + 1] = cpu
        return out

    vmm.MachineSpec.argv = argv if cpu else STOCK_ARGV  # type: ignore[method-assign]


def snapshot_for(cfg: dict[str, Any], cache: str, scratch: Path, run: Run) -> Any:
    """The stock template's snapshot; under another ``-cpu`` one of its own, booted
    in a scratch cache that links the plugin's guest images (no image rebuild)."""
    if not cfg["cpu"]:
        return SnapshotStore(cache).get(Template(), run=run)
    own = scratch / cfg["cpu"]
    if not own.exists():
        own.mkdir()
        (own / "images").symlink_to(Path(cache, "images").resolve(), target_is_directory=True)
    apply(cfg)
    return SnapshotStore(own).get(Template(), run=run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--forks", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "pytest-vmfork"))
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.configs]
    results: dict[str, list[dict[str, Any]]] = {c["name"]: [] for c in configs}
    run = Run()
    scratch = Path(tempfile.mkdtemp(prefix="vmfork-knobs-"))
    try:
        snaps = {c["name"]: snapshot_for(c, args.cache, scratch, run) for c in configs}
        for block in range(args.blocks):
            k = block % len(configs)
            for cfg in configs[k:] + configs[:k]:
                apply(cfg)
                snap = snaps[cfg["name"]]
                load = os.getloadavg()[0]
                rows = timed_forks(snap, run, args.forks) if args.forks else []
                mem = concurrent_memory(snap, run, args.concurrent) if args.concurrent else {}
                rec = {"block": block, "config": cfg["name"], "load1": round(load, 2), "rows": rows, "memory": mem}
                results[cfg["name"]].append(rec)
                print(json.dumps(rec), flush=True)
    finally:
        apply(None)
        run.remove()
        for link in scratch.glob("*/images"):
            link.unlink()  # the link only; the plugin's image cache stays
        shutil.rmtree(scratch)
    for name, recs in results.items():
        rows = [r for rec in recs for r in rec["rows"]]
        summary: dict[str, Any] = {"summary": name, "forks": len(rows),
                                   "loads": [rec["load1"] for rec in recs]}
        for key in ("restore_ms", "first_exec_ms", "fork_first_exec_ms"):
            if rows:
                vals = sorted(r[key] for r in rows)
                summary[key] = {"p50": round(statistics.median(vals), 1),
                                "p95": round(vals[min(len(vals) - 1, round(0.95 * (len(vals) - 1)))], 1)}
        if rows:
            summary["code_mib_p50"] = round(statistics.median(r["code_bytes"] for r in rows) / 2**20, 1)
            summary["flushes_max"] = max(r["flushes"] for r in rows)
        mems = [rec["memory"] for rec in recs if rec["memory"]]
        if mems:
            summary["pss_per_fork_mib"] = [m["pss_per_fork_mib"] for m in mems]
            summary["classes_pss_mib"] = {
                cls: round(statistics.median(m["classes"][cls]["pss"] for m in mems), 1) for cls in forkmem.CLASSES
            }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
