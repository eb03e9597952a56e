"""Fork figures of the stock template, for comparing two checkouts (docs/performance.md).

    python tests/bench/fork_ab.py CACHE_DIR FORKS LABEL

prints one JSON line: whether the snapshot was a cache hit, the template's cold boot,
and per fork (restore-to-healthy ms, first exec ms, fork + first exec ms). No network,
no warm pool: plain library forks. Written against the API both the old and the new
checkout have (SnapshotStore.get, fork, vm.timings, vm.exec), so the same script
measures both; run the two checkouts in alternating blocks on one machine.
"""

import json
import sys
import time
from typing import Any, Callable

from pytest_vmfork import Run, SnapshotStore, Template, fork


def timed_fork(snap: Any, run: Run, inspect: Callable[[Any], Any] | None = None) -> tuple[Any, ...]:
    """One fork: (restore-to-healthy ms, first exec ms, fork + first exec ms), and
    ``inspect(vm)``'s result after the exec if given (the VM is closed after it)."""
    t = time.monotonic()
    with fork(snap, run=run) as vm:
        ready = vm.timings["restore_to_healthy_ms"]
        t1 = time.monotonic()
        vm.exec(["true"])
        first = (time.monotonic() - t1) * 1000
        extra = (inspect(vm),) if inspect else ()
    return (ready, round(first, 2), round((t1 - t) * 1000 + first, 2), *extra)


def main() -> None:
    cache, n, label = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    run = Run()
    try:
        snap = SnapshotStore(cache).get(Template(), run=run)
        rows = [timed_fork(snap, run) for _ in range(n)]
    finally:
        run.remove()
    print(json.dumps({"label": label, "boot_s": snap.boot_s, "cache_hit": snap.cache_hit, "rows": rows}))


if __name__ == "__main__":
    main()
