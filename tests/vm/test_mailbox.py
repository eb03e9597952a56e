"""Mailbox payloads patched into a fork's memory before it resumes (real VMs)."""

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from pytest_vmfork import AckTimeout, ConfigError, Run, fork
from pytest_vmfork.vm.fork import MailboxPayload
from pytest_vmfork.vm.snapshot import Snapshot


def read_payload(vm, name):
    return json.loads(vm.exec(["cat", f"/run/vmfork/mailbox/{name}.json"]).check().stdout)


@pytest.mark.vmfork_mailbox("app-config", {"feature": "on", "n": 3})
@pytest.mark.vmfork_mailbox("scenario", {"steps": ["a", "b"]})
def test_marker_payloads_are_files_in_the_guest_the_moment_it_resumes(vm):
    assert read_payload(vm, "app-config") == {"feature": "on", "n": 3}
    assert read_payload(vm, "scenario") == {"steps": ["a", "b"]}
    assert vm.read_mailbox("app-config") == {"feature": "on", "n": 3}
    assert vm.timings["patch_ms"] > 0 and vm.timings["mailbox_path"] == "direct"


def test_mailbox_without_payload_is_absent(vm):
    assert vm.exec(["test", "-e", "/run/vmfork/mailbox/app-config.json"]).returncode == 1
    assert vm.read_mailbox("app-config") is None


def test_two_forks_of_one_snapshot_get_their_own_payloads_in_parallel(vmfork_snapshot):
    run, vms, errors = Run(), {}, []

    def one(tag):
        try:
            vms[tag] = fork(vmfork_snapshot, run=run, mailboxes={"app-config": {"who": tag}})
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(t,)) for t in ("left", "right")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert read_payload(vms["left"], "app-config") == {"who": "left"}
        assert read_payload(vms["right"], "app-config") == {"who": "right"}
    finally:
        for machine in vms.values():
            machine.close()
        run.remove()


@pytest.mark.vmfork_mailbox("app-config", {"x": 1}, wait_for_ack=True, ack_timeout=5)
def test_wait_for_ack_makes_the_fork_ready_only_after_the_guest_acknowledged(vm):
    assert vm.timings["ack_ms"]["app-config"] >= 0
    assert read_payload(vm, "app-config") == {"x": 1}


def live_qemu_in(run: Run) -> list[str]:
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and str(run.dir).encode() in cmd:
            hits.append(pid)
    return hits


@pytest.mark.parametrize(
    ("mailboxes", "message"),
    [
        ({"app-config": {"blob": "x" * 5000}}, r"payload is 5011 bytes encoded but the mailbox holds 3968 bytes"),
        ({"bad name": {}}, r"invalid mailbox name 'bad name'"),
        ({f"m{i}": {} for i in range(17)}, r"17 mailboxes requested for one fork; at most 16"),
        ({"cfgg": {}}, r"unknown mailbox 'cfgg'; this snapshot offers: app-config, scenario"),
        ({"app-config": [1, 2]}, r"payload must be a JSON object"),
        ({"app-config": MailboxPayload({}, ack_timeout=-1)}, r"ack_timeout=-1 must be a number of seconds"),
        ({"app-config": MailboxPayload({}, ack_timeout=3600)}, r"ack_timeout=3600 must be a number"),
    ],
)
def test_bad_mailbox_requests_fail_with_their_message_and_start_nothing(vmfork_snapshot, mailboxes, message):
    run = Run()
    try:
        with pytest.raises(ConfigError, match=message):
            fork(vmfork_snapshot, run=run, mailboxes=mailboxes)
        assert live_qemu_in(run) == []
        assert [p.name for p in run.dir.iterdir() if p.is_dir()] == []
    finally:
        run.remove()


def test_ack_timeout_fails_the_fork_cleanly_and_names_the_mailbox(vmfork_snapshot):
    run = Run()
    try:
        # "scenario" is acked by a guest program (vmfork-ack), and none is running
        with pytest.raises(AckTimeout, match=r"mailbox 'scenario' was not acknowledged within 0.5s"):
            fork(vmfork_snapshot, run=run, network="user",
                 mailboxes={"scenario": MailboxPayload({"a": 1}, wait_for_ack=True, ack_timeout=0.5)})
        assert live_qemu_in(run) == []
    finally:
        run.remove()


def test_guest_acked_mailbox_leaves_the_ack_for_a_guest_program(vm_factory):
    vm = vm_factory(mailboxes={"scenario": {"go": True}})
    assert read_payload(vm, "scenario") == {"go": True}
    # no ack requested: nothing pending for vmfork-ack
    res = vm.exec(["vmfork-ack", "scenario"])
    assert res.returncode == 1 and b"no ack is pending" in res.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_shared_snapshot_memory_file_never_changes(vmfork_snapshot):
    mem = vmfork_snapshot.memory_path
    before, mtime = sha256(mem), mem.stat().st_mtime_ns
    run = Run()
    try:
        for i in range(6):
            with fork(vmfork_snapshot, run=run, mailboxes={"app-config": {"i": i, "pad": "y" * 3000}}) as machine:
                machine.exec("echo scribble > /root/x && dd if=/dev/urandom of=/tmp/big bs=1M count=8 2>/dev/null")
    finally:
        run.remove()
    assert sha256(mem) == before and mem.stat().st_mtime_ns == mtime


def test_a_wrong_recorded_offset_falls_back_to_a_scan_and_says_so(vmfork_snapshot, tmp_path):
    copy = tmp_path / "snap"
    copy.mkdir()
    for name in ("state.bin", "manifest.json"):
        shutil.copy(vmfork_snapshot.dir / name, copy / name)
    os.symlink(vmfork_snapshot.memory_path, copy / "memory.ram")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["offsets"]["app-config"] = manifest["offsets"]["scenario"]  # points at another mailbox
    (copy / "manifest.json").write_text(json.dumps(manifest))
    snap = Snapshot(**{**vmfork_snapshot.__dict__, "dir": copy, "offsets": manifest["offsets"]})
    run = Run()
    try:
        with fork(snap, run=run, mailboxes={"app-config": {"found": "by scan"}}) as machine:
            assert machine.timings["mailbox_path"] == "scan"
            assert read_payload(machine, "app-config") == {"found": "by scan"}
    finally:
        run.remove()


def test_a_second_resume_of_the_same_memory_delivers_again(vm_factory):
    vm = vm_factory(mailboxes={"app-config": {"round": 1}})
    first_gen = vm.generation
    vm.deliver({"app-config": {"round": 2}, "scenario": {"late": True}})
    assert vm.generation != first_gen
    assert read_payload(vm, "app-config") == {"round": 2}
    assert read_payload(vm, "scenario") == {"late": True}
    vm.deliver({"app-config": {"round": 3}})
    assert vm.read_mailbox("app-config") == {"round": 3}
    assert vm.exec(["true"]).returncode == 0  # control channel survives each resume
