"""Layers end to end: vm.snapshot() of running forks, forks of those, at depth 3.

Real forks on the run's TAP network (these tests run as root); the host side
listens on an ephemeral port and bounds every wait.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pytest_vmfork import VM, ConfigError, Snapshot, StateError, fork, vmfork_layer
from pytest_vmfork.vm.snapshot import file_sha256

READ_RANDOM = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"
#: Dials the host (the default gateway) and sends this fork's name.
DIAL_HOST = (
    "python3 -c 'import socket, subprocess, sys; "
    "gw = subprocess.check_output([\"ip\", \"-4\", \"route\", \"show\", \"default\"]).split()[2].decode(); "
    "s = socket.create_connection((gw, int(sys.argv[1])), 10); s.sendall(sys.argv[2].encode()); s.close()' "
)


def start_app(vm: VM) -> None:
    """A layer's setup: a file and a background process that outlive the snapshot."""
    assert vm.exec("echo prepared > /root/layer-file && sync").returncode == 0
    started = vm.exec("setsid sleep 86400 </dev/null >/dev/null 2>&1 & echo $!")
    assert started.returncode == 0
    vm.exec(f"echo {int(started.stdout)} > /root/layer-pid")


app_layer = vmfork_layer(start_app)


def checksums(snap: Snapshot) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in (snap.memory_path, snap.state_path)}


def test_two_forks_of_a_layer_share_its_file_and_process_but_not_payload_randomness_or_address(
    app_layer: Snapshot, vm_factory
):
    a = vm_factory(snapshot=app_layer, mailboxes={"app-config": {"fork": "a"}})
    b = vm_factory(snapshot=app_layer, mailboxes={"app-config": {"fork": "b"}})
    for machine in (a, b):
        assert machine.exec(["cat", "/root/layer-file"]).stdout == b"prepared\n"
        pid = machine.exec(["cat", "/root/layer-pid"]).stdout.strip().decode()
        assert machine.exec(["cat", f"/proc/{pid}/cmdline"]).stdout == b"sleep\x0086400\x00"
    assert a.read_mailbox("app-config") == {"fork": "a"}
    assert b.read_mailbox("app-config") == {"fork": "b"}
    ra, rb = a.exec(READ_RANDOM).stdout, b.exec(READ_RANDOM).stdout
    assert len(ra) == 64 and ra != rb
    assert a.ip and b.ip and a.ip != b.ip
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen(4)
        server.settimeout(30)
        port = server.getsockname()[1]
        seen = {}
        for machine in (a, b):
            assert machine.exec(DIAL_HOST + f"{port} {machine.name}").returncode == 0
            conn, (peer, _) = server.accept()
            with conn:
                conn.settimeout(10)
                seen[conn.recv(100).decode()] = peer
    assert seen == {a.name: a.ip, b.name: b.ip}


def test_a_layer_records_its_parent_and_depth(app_layer: Snapshot, vmfork_snapshot: Snapshot):
    assert app_layer.parent == vmfork_snapshot.key and app_layer.depth == 1
    assert app_layer.name == "start_app" and app_layer.dir.parent == vmfork_snapshot.dir.parent
    assert app_layer.memory_path.stat().st_size == vmfork_snapshot.memory_path.stat().st_size
    assert app_layer.manifest["machine"]["rootfs"] == vmfork_snapshot.manifest["machine"]["rootfs"]


def test_a_fork_of_a_fork_of_a_fork_keeps_every_level_and_takes_new_payloads(vmfork_snapshot, vm_factory):
    snap = vmfork_snapshot
    for depth in (1, 2, 3):
        machine = vm_factory(snapshot=snap, mailboxes={"app-config": {"depth": depth}})
        assert machine.read_mailbox("app-config") == {"depth": depth}
        assert machine.exec(f"echo {depth} > /root/level-{depth}").returncode == 0
        child = machine.snapshot(f"level-{depth}")
        t = machine.timings
        assert t["snapshot_ms"] > 0 and 0 < t["snapshot_bytes"] <= child.memory_path.stat().st_size + 2**24
        assert machine.exec(["cat", f"/root/level-{depth}"]).stdout == f"{depth}\n".encode()  # it runs on
        assert (child.parent, child.depth, child.name) == (snap.key, depth, f"level-{depth}")
        snap = child
    last = vm_factory(snapshot=snap, mailboxes={"app-config": {"depth": 4}})
    assert last.exec("cat /root/level-1 /root/level-2 /root/level-3").stdout == b"1\n2\n3\n"
    assert last.read_mailbox("app-config") == {"depth": 4}
    assert last.exec(["test", "-e", "/root/level-4"]).returncode == 1
    assert abs(int(last.exec(["date", "+%s"]).stdout) - time.time()) < 10


def test_template_and_layer_files_are_unchanged_after_many_forks(app_layer, vmfork_snapshot, vm_factory):
    before = {"template": checksums(vmfork_snapshot), "layer": checksums(app_layer)}
    for i in range(6):
        machine = vm_factory(snapshot=app_layer if i % 2 else vmfork_snapshot,
                             mailboxes={"app-config": {"i": i}})
        # dirty plenty of guest RAM: page cache, tmpfs, the mailbox pages
        assert machine.exec("head -c 20000000 /dev/urandom > /dev/shm/fill && echo x > /root/layer-file"
                            ).returncode == 0
        machine.close()
    assert {"template": checksums(vmfork_snapshot), "layer": checksums(app_layer)} == before


def test_snapshot_without_resume_leaves_the_fork_paused(vm):
    snap = vm.snapshot(resume=False)
    assert vm.state == "paused" and snap.depth == 1
    with pytest.raises(StateError):
        vm.exec(["true"])
    with pytest.raises(StateError):
        vm.snapshot()


def test_bad_snapshot_arguments_are_refused_before_the_vm_pauses(vm):
    with pytest.raises(ConfigError, match="snapshot name"):
        vm.snapshot("")
    with pytest.raises(ConfigError, match="resume"):
        vm.snapshot(resume="no")  # type: ignore[arg-type]
    assert vm.state == "running" and vm.exec(["true"]).returncode == 0


def test_vmfork_layer_refuses_a_bad_key_before_any_vm():
    with pytest.raises(ConfigError, match="key="):
        vmfork_layer(start_app, key="")
    with pytest.raises(ConfigError, match="setup"):
        vmfork_layer("not callable")  # type: ignore[arg-type]


def test_a_snapshot_of_a_tap_fork_also_forks_without_network_and_with_user_mode(app_layer: Snapshot):
    assert app_layer.manifest.get("layer") == "start_app"  # saved from a fork on the run's TAP network
    for network in ("none", "user"):
        with fork(app_layer, network=network) as machine:
            assert machine.exec(["cat", "/root/layer-file"]).stdout == b"prepared\n"


def wait_in_guest(vm: VM, check: str, what: str, timeout: float = 60.0) -> None:
    """Until the guest's ``check`` (a shell test) succeeds: a signal from the guest, bounded."""
    deadline = time.monotonic() + timeout
    while vm.exec(check).returncode != 0:
        assert time.monotonic() < deadline, f"{what} did not happen in the guest within {timeout}s"


def test_forks_answer_their_first_request_whatever_their_snapshot_had_in_flight(vm_factory):
    """At every level of a depth-3 chain the snapshot is taken with requests in flight
    on the control channel: an exec still running, a background process's long poll,
    a put half sent. Every fork answers its first request; the VM that took the
    snapshot gets every one of its own answers."""
    machine = vm_factory()
    payload = bytes(range(256)) * (96 << 12)  # 24 MiB: still streaming when the vCPUs stop
    for depth in (1, 2, 3):
        machine.exec("rm -f /tmp/gate && mkfifo /tmp/gate").check()
        results: dict[str, object] = {}

        def run(key: str, fn) -> threading.Thread:
            t = threading.Thread(target=lambda: results.__setitem__(key, fn()), daemon=True)
            t.start()
            return t

        sleeper = machine.spawn(["sleep", "600"])
        threads = [
            run("gate", lambda m=machine: m.exec(["cat", "/tmp/gate"], timeout=120)),
            run("poll", lambda p=sleeper: p.wait(timeout=120)),
            run("put", lambda m=machine: m.put("/root/big", payload, timeout=300)),
        ]
        wait_in_guest(machine, "pgrep -x cat", "the gated exec")
        wait_in_guest(machine, "ls -a /root | grep -q vmfork-", "the put")
        child = machine.snapshot(f"in-flight-{depth}")
        machine.exec("echo go > /tmp/gate").check()
        assert sleeper.kill()
        for t in threads:
            t.join(300)
        assert results["gate"].stdout == b"go\n"  # the snapshot's own VM got its answers
        assert results["poll"] == -9
        assert machine.exec("wc -c < /root/big").stdout.strip() == str(len(payload)).encode()
        fork_ = vm_factory(snapshot=child)
        assert fork_.exec(["echo", f"first at depth {depth}"]).stdout == f"first at depth {depth}\n".encode()
        # The fork's copy of the gated exec ends; its answer belongs to a session nobody reads.
        fork_.exec("echo late > /tmp/gate").check()
        assert fork_.spawn(["echo", "spawned"]).wait(timeout=60) == 0
        assert fork_.get("/etc/hostname") == b"vmfork\n"
        machine = fork_
