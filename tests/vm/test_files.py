"""vm.put / get / put_tree / get_tree over the control channel (real forks)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from pytest_vmfork import ConfigError, GuestFileError

MIB = 1 << 20


def guest_sha256(vm, path: str) -> str:
    return vm.exec(["sha256sum", path], timeout=120).check().stdout.split()[0].decode()


def test_100_mib_file_goes_in_and_out_with_the_same_sha256(vm, tmp_path):
    data = os.urandom(100 * MIB)
    host = tmp_path / "big.bin"
    host.write_bytes(data)
    vm.put("/root/big.bin", host)
    assert guest_sha256(vm, "/root/big.bin") == hashlib.sha256(data).hexdigest()
    del data
    vm.exec("rm /root/big.bin && head -c 104857600 /dev/urandom > /root/out.bin", timeout=120).check()
    want = guest_sha256(vm, "/root/out.bin")
    got = vm.get("/root/out.bin")
    assert len(got) == 100 * MIB and hashlib.sha256(got).hexdigest() == want


def test_put_writes_bytes_and_str_as_content_and_sets_the_mode(vm):
    vm.put("/opt/app/bin/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)  # parents are created
    assert vm.exec(["/opt/app/bin/run.sh"]).stdout == b"ran\n"
    assert vm.exec(["stat", "-c", "%a", "/opt/app/bin/run.sh", "/opt/app/bin"]).stdout == b"755\n755\n"
    vm.put("/etc/app.conf", b"\x00binary\xff")
    assert vm.get("/etc/app.conf") == b"\x00binary\xff"
    assert vm.exec(["stat", "-c", "%a", "/etc/app.conf"]).stdout == b"644\n"
    vm.exec("chmod 600 /etc/app.conf").check()
    vm.put("/etc/app.conf", "new")  # an existing file keeps its mode
    assert vm.exec(["stat", "-c", "%a", "/etc/app.conf"]).stdout == b"600\n"
    assert vm.get("/etc/app.conf") == b"new"
    vm.put("/root/empty", b"")
    assert vm.get("/root/empty") == b""
    assert vm.get("/proc/sys/kernel/ostype") == b"Linux\n"  # size 0 in stat: the content decides


def test_a_str_is_content_never_a_host_path(vm, tmp_path):
    host = tmp_path / "f.txt"
    host.write_text("from the host file")
    vm.put("/root/a", str(host))
    vm.put("/root/b", host)
    assert vm.get("/root/a") == str(host).encode()
    assert vm.get("/root/b") == b"from the host file"


def test_exec_answers_while_a_big_put_is_still_streaming(vm, tmp_path):
    """The put reads from a FIFO the test keeps open, so it cannot finish before
    the execs do; they share the one virtio-serial connection with it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sent = threading.Event()
    release = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        with open(fifo, "wb") as f:
            block = os.urandom(MIB)
            for i in range(48):
                f.write(block)
                if i == 8:
                    sent.set()
            release.wait(120)

    def putter() -> None:
        try:
            vm.put("/root/streamed.bin", fifo)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=putter)]
    for t in threads:
        t.start()
    try:
        assert sent.wait(120), "the put never started reading"
        for i in range(3):
            assert vm.exec(["echo", str(i)], timeout=60).stdout == f"{i}\n".encode()
        assert threads[1].is_alive(), "the put finished before the execs: nothing was concurrent"
    finally:
        release.set()
        for t in threads:
            t.join(180)
    assert not errors, errors
    assert vm.exec(["stat", "-c", "%s", "/root/streamed.bin"]).stdout == b"%d\n" % (48 * MIB)


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin/tool").write_text("#!/bin/sh\necho tool\n")
    (root / "bin/tool").chmod(0o750)
    (root / "etc").mkdir()
    (root / "etc/secret").write_bytes(b"s3cret")
    (root / "etc/secret").chmod(0o600)
    (root / "etc/big").write_bytes(os.urandom(3 * MIB + 17))  # several chunks
    (root / "empty-dir").mkdir()
    (root / "ro").mkdir()
    (root / "ro/inside").write_text("in a read-only dir")
    (root / "ro").chmod(0o555)
    (root / "link-to-tool").symlink_to("bin/tool")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "dangling").symlink_to("no/such/target")
    (root / "etc-link").symlink_to("etc")  # a link to a directory stays a link


LISTING = """
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        rel = os.path.relpath(p, root)
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ["link", os.readlink(p)]
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ["dir", oct(stat.S_IMODE(st.st_mode))]
        else:
            with open(p, "rb") as f:
                out[rel] = ["file", oct(stat.S_IMODE(st.st_mode)), hashlib.sha256(f.read()).hexdigest()]
print(json.dumps(out))
"""


def listing(root: Path) -> dict[str, list]:
    """Every entry under root: kind, mode (or link target), content hash. The same
    script runs on the host and in the guest."""
    import subprocess
    import sys

    return json.loads(subprocess.run([sys.executable, "-c", LISTING, str(root)], capture_output=True,
                                     check=True).stdout)


def guest_listing(vm, root: str) -> dict[str, list]:
    return json.loads(vm.exec(["python3", "-c", LISTING, root]).check().stdout)


def test_tree_goes_in_and_out_keeping_modes_and_symlinks(vm, tmp_path):
    src, back = tmp_path / "src", tmp_path / "back"
    make_tree(src)
    want = listing(src)
    assert want["ro"] == ["dir", "0o555"] and want["etc-link"] == ["link", "etc"]
    vm.put_tree(src, "/srv/tree")
    assert guest_listing(vm, "/srv/tree") == want
    assert vm.exec(["/srv/tree/link-to-tool"]).stdout == b"tool\n"
    vm.get_tree("/srv/tree", back)  # host_dir is created
    assert listing(back) == want
    vm.exec("chmod u+w /srv/tree/ro && echo more > /srv/tree/ro/added").check()
    vm.get_tree("/srv/tree", back)  # merges into an existing directory
    assert (back / "ro/added").read_text() == "more\n"
    for p in (back / "ro", src / "ro"):
        p.chmod(0o755)  # so tmp_path can be removed


def guest_error(call) -> GuestFileError:
    with pytest.raises(GuestFileError) as info:
        call()
    return info.value


def test_guest_errors_name_the_guest_path_and_the_cause(vm):
    e = guest_error(lambda: vm.get("/no/such/file"))
    assert e.errno == errno.ENOENT and e.guest_path == "/no/such/file"
    assert str(e) == "get /no/such/file failed: guest path /no/such/file: No such file or directory (ENOENT)"
    e = guest_error(lambda: vm.get("/etc"))
    assert e.errno == errno.EISDIR and "guest path /etc: Is a directory (EISDIR)" in str(e)
    e = guest_error(lambda: vm.put("/etc/hostname/x", b"data"))
    assert e.errno == errno.ENOTDIR and e.guest_path == "/etc/hostname"
    assert str(e) == "put /etc/hostname/x failed: guest path /etc/hostname: Not a directory (ENOTDIR)"
    e = guest_error(lambda: vm.get_tree("/etc/hostname", "/tmp/unused-vmfork-test"))
    assert e.errno == errno.ENOTDIR and "/etc/hostname" in str(e)
    e = guest_error(lambda: vm.get_tree("/no/such/dir", "/tmp/unused-vmfork-test"))
    assert e.errno == errno.ENOENT and "guest path /no/such/dir: No such file or directory" in str(e)
    # Root in the guest: sysfs refuses new files and write-only attributes.
    e = guest_error(lambda: vm.put("/sys/vmfork-test", b"x"))
    assert e.errno == errno.EACCES and "Permission denied (EACCES)" in str(e)
    e = guest_error(lambda: vm.get("/sys/bus/pci/rescan"))
    assert e.errno == errno.EACCES and "guest path /sys/bus/pci/rescan: Permission denied" in str(e)


def test_a_full_guest_tmpfs_fails_the_put_with_enospc(vm, tmp_path):
    vm.exec("mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small").check()
    e = guest_error(lambda: vm.put("/mnt/small/big", os.urandom(2 * MIB)))
    assert e.errno == errno.ENOSPC and e.guest_path == "/mnt/small/big"
    assert "guest path /mnt/small/big: No space left on device (ENOSPC)" in str(e)
    assert "tmpfs in guest RAM" in str(e)
    assert vm.exec("ls -A /mnt/small").stdout == b""  # no partial or temporary file left
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(2 * MIB))
    e = guest_error(lambda: vm.put_tree(tree, "/mnt/small/tree"))
    assert e.errno == errno.ENOSPC and "/mnt/small/tree/f" in str(e)


def test_host_side_errors_are_raised_before_the_guest_is_asked(vm, tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read host file .*/missing: No such file or directory"):
        vm.put("/root/x", tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"is a directory; use put_tree"):
        vm.put("/root/x", tmp_path)
    with pytest.raises(ConfigError, match=r"host directory .*/nope does not exist"):
        vm.put_tree(tmp_path / "nope", "/root/x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"host path .*/file is not a directory"):
        vm.put_tree(tmp_path / "file", "/root/x")
    with pytest.raises(ConfigError, match=r"host path .*/file is not a directory"):
        vm.get_tree("/etc", tmp_path / "file")
    with pytest.raises(ConfigError, match=r"guest path 'relative/path' must be an absolute path"):
        vm.get("relative/path")
    with pytest.raises(ConfigError, match=r"data must be bytes or str .* got int"):
        vm.put("/root/x", 42)
    with pytest.raises(ConfigError, match=r"mode=511.5 must be permission bits"):
        vm.put("/root/x", b"", mode=511.5)
    os.mkfifo(tmp_path / "src-fifo")
    (tmp_path / "tree").mkdir()
    os.mkfifo(tmp_path / "tree/fifo")
    with pytest.raises(ConfigError, match=r"tree/fifo is not a regular file, directory or symlink"):
        vm.put_tree(tmp_path / "tree", "/root/tree")
    assert vm.exec(["test", "-e", "/root/tree"]).returncode == 1
