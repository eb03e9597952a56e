"""Private directories and files (pytest_vmfork.host.private): what a run trusts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_vmfork.host import confine, private
from pytest_vmfork.host.run import Run
from pytest_vmfork.net import forkleases, leases


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def test_a_missing_directory_is_created_with_mode_0700(tmp_path):
    path = private.private_dir(tmp_path / "a" / "runs", "run directory base")
    assert path.is_dir() and mode(path) == 0o700


def test_a_directory_others_can_write_is_refused_naming_path_and_fix(tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(private.PrivateDirError, match=rf"{planted} is writable by group or others \(mode 0777\)"
                       r".*rm -rf"):
        private.private_dir(planted, "run directory base")
    assert mode(planted) == 0o777  # refused, not repaired


def test_a_symlink_is_refused_even_to_a_private_directory(tmp_path):
    real = private.private_dir(tmp_path / "real", "x")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(private.PrivateDirError, match=f"{link} is a symlink"):
        private.private_dir(link, "run directory base")


def test_a_directory_owned_by_another_uid_is_refused(tmp_path):
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(private.PrivateDirError, match=f"{other} is owned by uid 65534, not by this uid"):
        private.private_dir(other, "lease root")


def test_our_directory_that_others_may_only_read_is_tightened_to_0700(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    old.chmod(0o755)
    private.private_dir(old, "cache directory")
    assert mode(old) == 0o700


def test_run_directories_live_under_xdg_runtime_dir_when_set(tmp_path, monkeypatch):
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    run = Run()
    try:
        assert run.dir.parent == xdg / "vmfork" and mode(xdg / "vmfork") == 0o700
        assert (run.dir / "owner.json").is_file() and mode(run.dir / "owner.json") == 0o600
    finally:
        run.remove()


def test_a_planted_run_base_is_refused_by_run(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    planted = tmp_path / f"vmfork-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(private.PrivateDirError, match=str(planted)):
        Run()
    assert list(planted.iterdir()) == []


def test_a_planted_lease_root_is_refused(tmp_path):
    root = tmp_path / "leases"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(private.PrivateDirError, match=f"lease root {root} is writable"):
        forkleases.RunLeases("run1", "10.219.0.0/24", root).lock()
    with pytest.raises(private.PrivateDirError, match="lease root"):
        leases.acquire_subnet("run1", "10.219.0.0/24", lease_root=root, host_nets=[])


def test_files_are_never_written_through_a_symlink(tmp_path):
    d = private.private_dir(tmp_path / "d", "x")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / "handles.json").symlink_to(victim)
    private.write_json(d / "handles.json", {"pid": 1})
    assert victim.read_text() == "precious"
    assert not (d / "handles.json").is_symlink() and b'"pid": 1' in (d / "handles.json").read_bytes()
    (d / "owner.json").symlink_to(victim)
    with pytest.raises(FileExistsError):  # exclusive: an existing name (a symlink too) is never replaced
        private.write_json(d / "owner.json", {"pid": 1}, exclusive=True)
    assert victim.read_text() == "precious" and list(d.glob(".*.tmp")) == []


def test_a_cache_entry_someone_else_can_write_is_refused(tmp_path):
    entry = private.private_dir(tmp_path / "snapshots" / "abc", "x")
    (entry / "state.bin").write_bytes(b"state")
    private.verify_cache_entry(entry)
    (entry / "state.bin").chmod(0o666)
    with pytest.raises(private.PrivateDirError, match="state.bin is writable by someone else"):
        private.verify_cache_entry(entry)
    (entry / "state.bin").chmod(0o644)
    os.chown(entry / "state.bin", 65534, 65534)
    with pytest.raises(private.PrivateDirError, match="owner uid 65534"):
        private.verify_cache_entry(entry)


def test_only_the_qemu_groups_write_bit_on_a_ram_file_is_accepted_and_sealing_keeps_it(tmp_path, monkeypatch):
    entry = private.private_dir(tmp_path / "snapshots" / "ram", "x")
    ram, state = entry / private.RAM_FILE, entry / "state.bin"
    ram.write_bytes(b"\0" * 4096)
    state.write_bytes(b"state")
    qemu_gid = 65534  # a group not ours, standing for vmfork-qemu's
    monkeypatch.setattr(confine, "ram_group_gid", lambda: qemu_gid)
    os.chown(ram, -1, qemu_gid)
    ram.chmod(0o660)
    private.seal(entry)  # a foreign group's write on the RAM file was given on purpose: kept
    assert ram.stat().st_mode & 0o777 == 0o660
    private.verify_cache_entry(entry, ram_gid=qemu_gid)
    for ram_gid in (None, qemu_gid + 1):  # no QEMU group, or another one: refused
        with pytest.raises(private.PrivateDirError, match="memory.ram is writable by someone else"):
            private.verify_cache_entry(entry, ram_gid=ram_gid)
    ram.chmod(0o662)  # others' write is never accepted
    with pytest.raises(private.PrivateDirError, match="memory.ram is writable by someone else"):
        private.verify_cache_entry(entry, ram_gid=qemu_gid)
    ram.chmod(0o660)
    os.chown(state, -1, qemu_gid)
    state.chmod(0o660)  # only the RAM file may be the QEMU group's to write
    with pytest.raises(private.PrivateDirError, match="state.bin is writable by someone else"):
        private.verify_cache_entry(entry, ram_gid=qemu_gid)
    for gid in (os.getegid(), qemu_gid + 1):  # our own group's write (a umask of 002), another's: sealed away
        os.chown(ram, -1, gid)
        ram.chmod(0o664)
        private.seal(entry)
        assert ram.stat().st_mode & 0o777 == 0o644
