"""Benchmarks of the fork path (pytest-benchmark); not part of ``make test``.

Everything under tests/bench is skipped unless the run asks for benchmarks:
``--benchmark-only`` on the command line or ``VMFORK_BENCH=1`` in the
environment (``make bench`` sets both). They also need one process: under
xdist (``-n``) pytest-benchmark disables timing, so they skip there too.

Knobs (environment, all optional):

- ``VMFORK_BENCH_ROUNDS``: measured forks per restore benchmark (default 20, plus 1 warm-up)
- ``VMFORK_BENCH_COLD_ROUNDS``: template cold boots (default 3)
- ``VMFORK_BENCH_FORKS_PER_WORKER``: forks per process in the forks/s benchmark (default 8, 2 processes)
- ``VMFORK_BENCH_SNAPSHOT_ROUNDS``: ``vm.snapshot()`` calls timed (default 5)
- ``VMFORK_BENCH_MEMORY_COUNTS``: concurrent-fork levels of the memory benchmark (default ``1,10,20``)
- ``VMFORK_BENCH_TWO_RUNS_TESTS``: tests per run in the two-runs-at-once benchmark (default 12)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from pytest_vmfork import Run
from pytest_vmfork.config import Settings
from pytest_vmfork.net.network import RunNetwork, has_net_admin
from pytest_vmfork.plugin import SESSION_KEY

HERE = Path(__file__).resolve().parent
SUMMARY = pytest.StashKey[list[str]]()


def bench_enabled(config: pytest.Config) -> bool:
    return os.environ.get("VMFORK_BENCH") == "1" or bool(config.getoption("benchmark_only", False))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every item of the session: touch only ours.
    if not bench_enabled(config):
        reason = "benchmark: run `make bench` (or pass --benchmark-only, or set VMFORK_BENCH=1)"
    elif hasattr(config, "workerinput"):
        reason = "benchmarks need a single process: run them without -n"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


def env_int(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    if value < 1:
        raise pytest.UsageError(f"{name}={value}: use a positive integer")
    return value


@pytest.fixture(scope="session")
def bench_settings(request: pytest.FixtureRequest) -> Settings:
    """The plugin's resolved settings (cache dir, subnet pool, lease dir, ...)."""
    return request.config.stash[SESSION_KEY].settings


@pytest.fixture(scope="session")
def bench_run() -> Iterator[Run]:
    """A run directory of the benchmarks' own, removed at the end."""
    run = Run()
    yield run
    run.remove()


@pytest.fixture(scope="session")
def bench_network(bench_run: Run, bench_settings: Settings) -> Iterator[RunNetwork]:
    """The run's bridge (forks get a TAP on it), the way the plugin brings it up."""
    if not has_net_admin():
        pytest.skip("the TAP network needs CAP_NET_ADMIN (run as root)")
    net = RunNetwork(
        bench_run.run_id, pool=bench_settings.subnet_pool, lease_root=bench_settings.lease_dir
    ).up()
    yield net
    net.down()


@pytest.fixture(scope="session")
def bench_results() -> dict[str, Any]:
    """Figures one benchmark hands to a later one (restore p50s for the cold-boot ratio)."""
    return {}


@pytest.fixture
def bench_say(request: pytest.FixtureRequest) -> Any:
    """``bench_say(line)``: a line for the "vmfork bench" section of the terminal summary."""
    lines = request.config.stash.setdefault(SUMMARY, [])

    def say(line: str) -> None:
        lines.append(line)

    return say


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("vmfork bench")
        for line in lines:
            terminalreporter.write_line(line)
