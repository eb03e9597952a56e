"""A spawned daemon that died before the test failed shows in the failure report
(pytester inner runs against the cached TEST_TEMPLATE snapshot)."""

import pytest

from .suites import CONFTEST


@pytest.fixture
def suite(pytester: pytest.Pytester, vmfork_snapshot):
    """A user suite on TEST_TEMPLATE; vmfork_snapshot makes the cached snapshot exist first."""
    pytester.makeconftest(CONFTEST)
    return pytester


def test_a_crashed_daemon_shows_its_status_and_output_tail_in_the_failure_report(suite):
    suite.makepyfile(
        """
        import signal

        def test_fails_after_its_daemon_crashed(vm):
            daemon = vm.spawn("echo 'daemon: listening'; echo 'daemon: fatal: bad config line 3' >&2; exit 42")
            still = vm.spawn(["sleep", "600"])
            victim = vm.spawn(["sleep", "600"])
            victim.signal(signal.SIGSEGV)
            daemon.wait(timeout=60)  # both deaths seen before the test fails: the report
            victim.wait(timeout=60)  # lists deaths, and a guest under load may lag behind
            assert False, "expected failure"

        def test_passes_with_a_daemon_still_running(vm):
            vm.spawn(["sleep", "600"])  # killed with the fork: never an error
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*vmfork console of f*",
        "*vmfork process * in f*: *exit 42*] exited with status 42 -*",
        "--- stdout (last lines) ---",
        "daemon: listening",
        "--- stderr (last lines) ---",
        "daemon: fatal: bad config line 3",
    ])
    out = result.stdout.str()
    assert "['sleep', '600'] killed by signal 11 (SIGSEGV) -" in out
    assert out.count("- vmfork process ") == 2  # the one still running is not a death
