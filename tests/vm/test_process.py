"""vm.spawn: background processes in a fork (real forks, real TAP network)."""

from __future__ import annotations

import errno
import signal
import urllib.request

import pytest

from pytest_vmfork import ConfigError, GuestFileError, ProcessTimeout, StateError, fork
from pytest_vmfork.vm.process import truncation_marker


def test_spawned_http_server_is_reached_over_tap_then_signalled_and_waited_for(vm):
    vm.put("/srv/www/index.html", "hello from the guest\n")
    server = vm.spawn(["python3", "-u", "-m", "http.server", "8000", "--bind", "0.0.0.0"], cwd="/srv/www")
    assert server.pid > 1 and server.returncode is None
    for line in server.lines(timeout=60):  # readiness is its own line, not a sleep
        if line.startswith(b"Serving HTTP on"):
            break
    with urllib.request.urlopen(f"http://{vm.ip}:8000/index.html", timeout=30) as resp:
        assert resp.read() == b"hello from the guest\n"
    assert server.poll() is None
    assert b'"GET /index.html HTTP/1.1" 200' in server.stderr  # its access log so far
    assert server.signal(signal.SIGTERM) is True
    assert server.wait(timeout=30) == -signal.SIGTERM
    assert server.returncode == -signal.SIGTERM and server.poll() == -signal.SIGTERM
    assert server.signal(signal.SIGTERM) is False  # already gone


def test_wait_returns_the_exit_status_and_all_output(vm):
    p = vm.spawn("cat; echo err >&2; pwd; echo $GREETING; exit 3", stdin="piped in\n", env={"GREETING": "hi"},
                 cwd="/tmp")
    assert p.wait(timeout=60) == 3
    assert p.stdout == b"piped in\n/tmp\nhi\n" and p.stderr == b"err\n"
    assert list(p.lines()) == [b"piped in\n", b"/tmp\n", b"hi\n"]
    assert list(p.lines("stderr")) == [b"err\n"]


def test_lines_come_as_the_process_prints_them(vm):
    # Line i+1 is printed only once the test has read line i and created /tmp/go<i>.
    p = vm.spawn("for i in 1 2 3; do echo line$i; while [ ! -e /tmp/go$i ]; do sleep 0.02; done; done; printf tail")
    got = []
    for line in p.lines(timeout=60):
        got.append(line)
        if line.startswith(b"line"):
            vm.exec(["touch", f"/tmp/go{len(got)}"]).check()
    assert got == [b"line1\n", b"line2\n", b"line3\n", b"tail"]
    assert p.returncode == 0


def test_output_is_bounded_and_marked_where_it_was_cut(vm):
    p = vm.spawn(["python3", "-c", "import sys; sys.stdout.write('x' * 9000 + 'END\\n')"], output_limit=1000)
    assert p.wait(timeout=60) == 0
    assert p.stdout == truncation_marker("stdout", 8004) + b"x" * 996 + b"END\n"
    assert p.stdout.startswith(b"[vmfork: 8004 earlier bytes of stdout dropped (output_limit)]\n")
    assert list(p.lines()) == [truncation_marker("stdout", 8004), b"x" * 996 + b"END\n"]


def test_wait_times_out_and_kill_ends_the_whole_process_group(vm):
    p = vm.spawn("sleep 600 & echo child=$!; wait")
    with pytest.raises(ProcessTimeout, match=r"did not exit within 0.5s"):
        p.wait(timeout=0.5)
    child = next(p.lines(timeout=60)).split(b"=")[1].strip().decode()
    assert p.kill() is True
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert vm.exec(["kill", "-0", child]).returncode != 0, "the shell's child survived kill()"


def test_spawn_errors_name_the_program_and_bad_input_is_refused(vm):
    with pytest.raises(GuestFileError, match=r"spawn \['/no/such/prog'\]: cannot start it: .*No such file") as e:
        vm.spawn(["/no/such/prog"])
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ConfigError, match="non-empty list of strings"):
        vm.spawn([])
    with pytest.raises(ConfigError, match="output_limit=0"):
        vm.spawn(["true"], output_limit=0)
    with pytest.raises(ConfigError, match="stdin must be bytes or str"):
        vm.spawn(["true"], stdin=3)


def test_a_process_still_running_at_teardown_dies_with_the_fork_without_error(vmfork_snapshot):
    with fork(vmfork_snapshot) as machine:
        p = machine.spawn(["sleep", "600"])
        assert p.poll() is None
    assert p.poll() is None  # last known: it died with the fork, unobserved
    with pytest.raises(StateError, match="died with its fork"):
        p.wait(timeout=1)


def test_report_sections_show_a_process_that_exited_with_its_status_and_output(vm):
    crashed = vm.spawn("echo starting; echo 'fatal: no config' >&2; exit 7")
    running = vm.spawn(["sleep", "600"])
    assert crashed.wait(timeout=60) == 7
    sections = dict(vm.report_sections())
    assert f"vmfork console of {vm.name} (last lines)" in sections
    title = f"vmfork process {crashed.pid} in {vm.name}: ['/bin/sh', '-c', \"echo starting; echo 'fatal: no config' >&2; exit 7\"] exited with status 7"
    assert sections[title] == "--- stdout (last lines) ---\nstarting\n--- stderr (last lines) ---\nfatal: no config"
    assert not any(str(running.pid) in t for t in sections)  # still running: not a death to report
