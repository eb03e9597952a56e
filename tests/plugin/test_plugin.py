"""The pytest plugin seen from a user's suite (pytester, real VMs in subprocesses)."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from pytest_vmfork.vm.kept import list_kept
from pytest_vmfork.vm.layer import discard

from .suites import CONFTEST


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, vmfork_snapshot):
    """A user suite using TEST_TEMPLATE, with its own short TMPDIR so its run
    directory (and anything left in it) can be inspected from outside.
    Depending on vmfork_snapshot makes the cached snapshot exist before it runs."""
    pytester.makeconftest(CONFTEST)
    tmp = Path(tempfile.mkdtemp(prefix="vmfk-"))
    monkeypatch.setenv("TMPDIR", str(tmp))
    pytester.tmp = tmp  # type: ignore[attr-defined]
    yield pytester
    subprocess.run(["rm", "-rf", str(tmp)], check=False)


def qemu_processes_under(path: Path) -> list[str]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmd and str(path) in cmd:
            out.append(f"{pid}: {cmd[:120]}")
    return out


def test_vm_fixture_gives_each_test_a_running_fork_and_prints_the_summary(suite):
    suite.makepyfile(
        """
        def test_one(vm):
            assert vm.exec(["true"]).returncode == 0
            assert vm.timings["restore_to_healthy_ms"] > 0

        def test_two(vm):
            assert vm.exec(["cat", "/root/warmup-done"]).stdout == b"warmed\\n"
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*vmfork summary*", "*cache hit*", "  fork + first exec p50 * ms, p95 * ms (2 forks ran a command)",
        "forks: 2  restore-to-healthy p50 * ms  p95 * ms  max * ms",
        "fork + first exec (2 forks ran a command): p50 * ms  p95 * ms  max * ms  (first exec alone p50 * ms)",
        "warm pool: 1 of 2 forks came pre-warmed, 1 forked cold",  # the second waited for the pre-warm
    ])
    assert qemu_processes_under(suite.tmp) == []
    assert not any(suite.tmp.rglob("*.sock")), "a VM's sockets were left behind"


def test_failing_test_report_includes_the_fork_console_tail(suite):
    suite.makepyfile(
        """
        def test_fails(vm):
            vm.exec("echo 'message-for-the-console' > /dev/console")
            assert False, "expected failure"
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*vmfork console of f*", "*message-for-the-console*"])
    assert qemu_processes_under(suite.tmp) == []


def test_vm_factory_forks_several_vms_and_tears_all_down(suite):
    suite.makepyfile(
        """
        import os
        PIDS = []

        def test_three(vm_factory):
            vms = [vm_factory() for _ in range(3)]
            assert len({v.name for v in vms}) == 3
            PIDS.extend(v.pid for v in vms)

        def test_gone():
            assert PIDS and not any(os.path.exists(f"/proc/{p}") for p in PIDS)
        """
    )
    suite.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly").assert_outcomes(passed=2)


def test_keep_failed_keeps_the_console_log_and_says_where(suite, vmfork_snapshot):
    suite.makepyfile("def test_fails(vm):\n    assert False\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--vmfork-keep-failed")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*kept failed VM * as *step in with: vmfork exec*"])
    assert list(suite.tmp.rglob("console.log"))
    assert qemu_processes_under(suite.tmp) == []
    mine = [k for k in list_kept(vmfork_snapshot.dir.parent.parent) if k.test.endswith("::test_fails")
            and k.test.startswith("test_keep_failed_keeps_the_console_log")]
    assert len(mine) == 1  # saved as a snapshot in the run's cache, too (tests/plugin/test_layers.py uses it)
    discard(mine[0].dir)


def test_fixtures_are_documented(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--fixtures")
    for name in ("vmfork_template", "vmfork_snapshot", "vmfork_snapshots", "vm_factory"):
        result.stdout.fnmatch_lines([f"{name} *", "*"])
    result.stdout.fnmatch_lines(["vm -- *", "*A running VM forked from*"])


def test_every_option_is_in_help(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--help")
    for flag in ("--vmfork-accel", "--vmfork-cache-dir", "--vmfork-rebuild", "--vmfork-keep-failed",
                 "--vmfork-ready-timeout"):
        result.stdout.fnmatch_lines([f"*{flag}*"])
    result.stdout.fnmatch_lines(["*vmfork_accel (string)*", "*vmfork_cache_dir*"])


def test_bad_option_value_is_a_usage_error_naming_it(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--vmfork-ready-timeout=soon")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*vmfork_ready_timeout='soon': use a number of seconds*"])


def test_bad_ini_value_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nvmfork_accel = xen\n")
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'xen' is not one of auto, tcg, kvm*"])


def test_unknown_mailbox_in_marker_fails_before_any_vm_starts(suite):
    suite.makepyfile(
        """
        import pytest

        @pytest.mark.vmfork_mailbox("cfgg", {"a": 1})
        def test_typo(vm):
            pass
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown mailbox 'cfgg'; this snapshot offers: app-config, scenario*"])
    assert not list(suite.tmp.rglob("console.log"))


def test_a_run_base_planted_by_another_user_is_refused_before_any_vm(suite, other_user):
    """Another user creates <tmp>/vmfork-<uid> (mode 0777) before root's first run."""
    suite.tmp.chmod(0o1777)  # a shared temp dir, like /tmp
    planted = suite.tmp / f"vmfork-{os.getuid()}"
    subprocess.run(["setpriv", f"--reuid={other_user.uid}", f"--regid={other_user.gid}", "--clear-groups", "--",
                    "mkdir", "-m", "0777", str(planted)], check=True)
    suite.makepyfile("def test_x(vm):\n    pass\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([(f"*run directory base {planted} is owned by uid {other_user.uid}, not by this "
                                  f"uid {os.getuid()}; refusing to use it: remove it*")])
    assert list(planted.iterdir()) == [], "root's run wrote into the planted directory"
    assert qemu_processes_under(suite.tmp) == []


def test_vmfork_qemu_user_option_and_ini_key_choose_the_user_qemu_runs_as(suite, other_user):
    suite.makepyfile(
        f"""
        from pathlib import Path

        def test_uid(vm):
            uids = next(l for l in Path(f"/proc/{{vm.pid}}/status").read_text().splitlines() if l.startswith("Uid:"))
            assert uids.split()[1:] == ["{other_user.uid}"] * 4
        """
    )
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", f"--vmfork-qemu-user={other_user.name}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"vmfork: QEMU runs as {other_user.name} (uid {other_user.uid}): configured*"])
    suite.makeini(f"[pytest]\nvmfork_qemu_user = {other_user.name}\n")
    suite.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_qemu_user_that_does_not_exist_is_a_usage_error_before_any_vm(suite):
    suite.makepyfile("def test_never(vm):\n    raise AssertionError('a VM was started')\n")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--vmfork-qemu-user=vmfork-nosuchuser")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*vmfork qemu user 'vmfork-nosuchuser' does not exist; create it (useradd*"])
    assert qemu_processes_under(suite.tmp) == []
