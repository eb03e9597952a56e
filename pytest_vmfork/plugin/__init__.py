"""The pytest plugin: options, fixtures, failure reports and the run summary.

Glue only. Building snapshots and forking VMs live in the library
(``pytest_vmfork.vm.snapshot`` / ``pytest_vmfork.vm.fork``) and work without pytest.
This package: the hooks and fixtures (here), the options table (``options``), the
per-process session (``session``) and the run statistics (``stats``).

May import: every library layer (``vm``, ``build``, ``net``, ``host``, the janitor) and
the bottom layer. Never the CLI, and nothing below imports this.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterator

import pytest

from pytest_vmfork.errors import ConfigError
from pytest_vmfork.host import private
from pytest_vmfork.host.run import Run, new_run_id
from pytest_vmfork.janitor.gc import gc_at_session_start
from pytest_vmfork.janitor.prune import enforce_max_size
from pytest_vmfork.plugin.options import OPTIONS, resolve_settings
from pytest_vmfork.plugin.session import ITEM_VMS, VMForkSession
from pytest_vmfork.plugin.stats import RunStats
from pytest_vmfork.vm.fork import VM, MailboxPayload
from pytest_vmfork.vm.layer import check_name
from pytest_vmfork.vm.snapshot import Snapshot
from pytest_vmfork.vm.template import Template

SESSION_KEY = pytest.StashKey[VMForkSession]()
#: this process's run statistics (and, on an xdist controller, its workers'): the run summary
STATS_KEY = pytest.StashKey[RunStats]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmfork", "pytest-vmfork: a forked VM per test")
    for opt in OPTIONS:
        if opt.flag_type == "bool":
            group.addoption(opt.flag, dest=opt.name, action="store_const", const=True, default=None, help=opt.help)
        else:
            group.addoption(opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(), help=opt.help)
        parser.addini(opt.name, opt.help, default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vmfork_mailbox(name, payload, *, wait_for_ack=False, ack_timeout=2.0): "
        "deliver a JSON payload to the `vm` fork's mailbox before it resumes (repeatable)",
    )
    try:
        settings = resolve_settings(config.getoption, config.getini)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from exc
    workerinput = getattr(config, "workerinput", None)
    try:  # a cache, run or lease directory someone else can write is refused here
        private.private_dir(settings.cache_dir, "cache directory")
        if workerinput is not None:
            run = Run(run_id=workerinput["testrunuid"], worker=workerinput["workerid"].replace("gw", "w"),
                      qemu_user=settings.qemu_user)
        else:
            # Never inherit PYTEST_XDIST_TESTRUNUID: a pytest started from inside a
            # worker is another run. Under xdist, hand our id to the workers so the
            # controller (which outlives them) owns the run directory they share.
            run_id = new_run_id()
            if getattr(config.option, "testrunuid", "unset") is None:
                config.option.testrunuid = run_id
            run = Run(run_id=run_id, qemu_user=settings.qemu_user)
    except (private.PrivateDirError, ConfigError) as exc:
        raise pytest.UsageError(str(exc)) from exc
    stats = config.stash[STATS_KEY] = RunStats()
    session = config.stash[SESSION_KEY] = VMForkSession(config, settings, run, stats)
    _install_signal_handlers(config)
    if workerinput is None:  # once per run, before any VM: leftovers of dead runs
        gc_at_session_start(lease_root=settings.lease_dir, cache_dir=settings.cache_dir,
                            progress=session.progress)


def _install_signal_handlers(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP end the run the way Ctrl-C does, so fixture teardown
    (VMs, TAPs, the run's bridge and leases) runs instead of the process just
    vanishing. QEMU would die anyway (PR_SET_PDEATHSIG); the rest would not."""
    if threading.current_thread() is not threading.main_thread():
        return

    owner = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked child (multiprocessing, netns helpers): not pytest
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"vmfork: received {signal.Signals(signum).name}, tearing down")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    config.add_cleanup(restore)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if state is not None and reporter is not None:
        for message in state.unshown:
            reporter.write_line(message)
        state.unshown.clear()


def _session(request: pytest.FixtureRequest) -> VMForkSession:
    return request.config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def vmfork_template() -> Template:
    """The template recipe (a ``pytest_vmfork.Template``) that every fork starts from.

    Override this fixture in your conftest.py to change memory, vCPUs, extra
    Debian packages, files, warm-up commands or mailboxes.
    """
    return Template()


@pytest.fixture(scope="session")
def vmfork_snapshots(request: pytest.FixtureRequest) -> Callable[[Template], Snapshot]:
    """``vmfork_snapshots(template) -> Snapshot``: any template's snapshot, for
    fixtures of any scope (a session-scoped one cannot use ``vmfork_snapshot``).
    Each distinct template is booted at most once per run, then memoized."""
    return _session(request).snapshot


@pytest.fixture
def vmfork_snapshot(request: pytest.FixtureRequest, vmfork_template: Template) -> Snapshot:
    """The snapshot of the ``vmfork_template`` this test sees (the closest override:
    class, module, conftest.py, plugin). Function-scoped so that an override of
    any scope works; the lookup is memoized, so it is free after the first.
    Booted once per run (once across xdist workers) and reused from the cache
    across runs while nothing that shapes the guest changed.
    ``vmfork_snapshot.mailboxes`` lists the mailboxes forks can receive."""
    return _session(request).snapshot(vmfork_template)


@pytest.fixture
def vm(request: pytest.FixtureRequest, vmfork_snapshot: Snapshot) -> Iterator[VM]:
    """A running VM forked from ``vmfork_snapshot`` for this test only; torn down after it.

    Payloads from ``@pytest.mark.vmfork_mailbox(name, payload)`` are in its memory
    before it resumes."""
    session = _session(request)
    payloads = _marker_payloads(request.node)
    machine = session.fork(vmfork_snapshot, payloads)
    request.node.stash.setdefault(ITEM_VMS, []).append(machine)
    yield machine
    session.release(machine, _failed(request.node), request.node)


def vmfork_layer(
    setup: Callable[[VM], Any],
    *,
    template: Template | None = None,
    key: str | None = None,
    name: str | None = None,
) -> Any:
    """A session-scoped fixture whose value is a layer: the Snapshot of a fork
    of the template after ``setup(vm)`` ran in it. Assign it in a conftest.py;
    the variable's name is the fixture's name::

        def seed(vm): vm.exec("...")
        seeded = vmfork_layer(seed, key=hash_of_my_fixture_files)

    ``template`` defaults to the session's ``vmfork_template``. The layer is
    built once per run, across xdist workers (a file lock per layer), and with
    a content ``key`` (a string that changes when what ``setup`` installs
    changes) it is kept in the cache and reused by later runs; without one it
    is removed when the run ends. ``name`` labels it (default: ``setup``'s name).
    Tests fork it with ``vm_factory(snapshot=seeded)``, or by returning it from
    an override of ``vmfork_snapshot`` so that ``vm`` starts from it.
    """
    if not callable(setup):
        raise ConfigError(f"vmfork_layer: setup must be a function taking the VM, got {setup!r}")
    if template is not None and not isinstance(template, Template):
        raise ConfigError(f"vmfork_layer: template= must be a pytest_vmfork.Template, got {type(template).__name__}")
    if key is not None and (not isinstance(key, str) or not key):
        raise ConfigError(f"vmfork_layer: key= must be a non-empty string (e.g. a hash of fixture files), got {key!r}")
    check_name(name)
    label = name or getattr(setup, "__name__", "layer")

    @pytest.fixture(scope="session")
    def layer(request: pytest.FixtureRequest) -> Snapshot:
        session = _session(request)
        base = session.snapshot(template if template is not None else request.getfixturevalue("vmfork_template"))
        return session.layer(base, setup, key=key, name=name, label=label)

    layer.__doc__ = f"The layer {label!r}: a snapshot of a fork after {label}(vm) ran in it."
    return layer


class VMFactory:
    """Fork any number of VMs in one test: ``vm_factory()``, ``vm_factory(mailboxes={...})``,
    ``vm_factory(template=Template(...))`` or ``vm_factory(snapshot=...)``."""

    def __init__(self, session: VMForkSession, default: Callable[[], Snapshot], node: pytest.Item) -> None:
        self._session = session
        self._default = default  # this test's vmfork_snapshot, looked up on first use only
        self._node = node
        self.vms: list[VM] = []

    def __call__(
        self,
        *,
        mailboxes: dict[str, Any] | None = None,
        snapshot: Snapshot | None = None,
        template: Template | None = None,
    ) -> VM:
        if snapshot is not None and template is not None:
            raise ConfigError("vm_factory: give template= or snapshot=, not both")
        if snapshot is not None and not isinstance(snapshot, Snapshot):
            raise ConfigError(f"vm_factory: snapshot= must be a pytest_vmfork.Snapshot, got {type(snapshot).__name__}")
        if template is not None:
            snapshot = self._session.snapshot(template)
        machine = self._session.fork(snapshot or self._default(), mailboxes)
        self.vms.append(machine)
        self._node.stash.setdefault(ITEM_VMS, []).append(machine)
        return machine


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    """A callable that forks a new VM per call; every VM it made is torn down after the test.
    Without ``template=``/``snapshot=`` it forks this test's ``vmfork_snapshot``, which is
    only looked up then: a test that names its own template never boots the default."""
    factory = VMFactory(_session(request), lambda: request.getfixturevalue("vmfork_snapshot"), request.node)
    yield factory
    failed = _failed(request.node)
    for machine in factory.vms:
        _session(request).release(machine, failed, request.node)


def _marker_payloads(node: pytest.Item) -> dict[str, Any] | None:
    payloads: dict[str, Any] = {}
    for mark in reversed(list(node.iter_markers("vmfork_mailbox"))):
        if len(mark.args) != 2:
            raise ConfigError(
                f"@pytest.mark.vmfork_mailbox takes (name, payload, *, wait_for_ack=False, ack_timeout=2.0), "
                f"got {len(mark.args)} positional arguments"
            )
        unknown = set(mark.kwargs) - {"wait_for_ack", "ack_timeout"}
        if unknown:
            raise ConfigError(
                f"@pytest.mark.vmfork_mailbox: unknown keyword {sorted(unknown)}; use wait_for_ack and ack_timeout"
            )
        name, payload = mark.args
        if name in payloads:
            raise ConfigError(f"@pytest.mark.vmfork_mailbox: mailbox {name!r} is given twice")
        payloads[name] = MailboxPayload(payload, **mark.kwargs)
    return payloads or None


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    if report.failed:
        for machine in item.stash.get(ITEM_VMS, []):
            report.sections.extend(machine.report_sections())
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return
    lines = session.finish_stats().summary_lines()
    if lines:
        terminalreporter.section("vmfork summary")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {}) or {}
    stats = node.config.stash.get(STATS_KEY, None)
    if "vmfork_stats" in output and stats is not None:
        stats.add_worker(output["vmfork_stats"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Tear down here, not only in unconfigure: an xdist worker reports itself
    finished right after this hook, and may be interrupted before unconfigure."""
    cfg = session.config
    state = cfg.stash.get(SESSION_KEY, None)
    if state is None:
        return
    state.close()
    if hasattr(cfg, "workeroutput"):
        cfg.workeroutput["vmfork_stats"] = state.finish_stats().export()
    elif state.settings.cache_max_size is not None:  # once per run, after every test and worker
        enforce_max_size(state.settings.cache_dir, state.settings.cache_max_size, state.progress)
