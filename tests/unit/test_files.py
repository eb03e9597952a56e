"""Pure logic of tree.py and process.py: the defences against an untrusted peer's tree stream.

tree.TreeWriter runs on both ends (guest for put_tree, host for get_tree)."""

from __future__ import annotations

import os

import pytest

from pytest_vmfork.errors import GuestError
from pytest_vmfork.proto import agent_pb2 as pb
from pytest_vmfork.tree import TreeWriter
from pytest_vmfork.vm.process import OutputBuffer, truncation_marker

TE = pb.TreeEntry


def write(root, entries, **limits):
    def fail(why):
        raise GuestError(f"bad tree ({why})")

    w = TreeWriter(str(root), fail=fail, max_bytes=limits.get("max_bytes", 1 << 20),
                   max_entries=limits.get("max_entries", 100))
    try:
        for e in entries:
            w.add(e)
        w.finish()
    finally:
        w.close()


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../escape", "a//b", "./a", ""])
def test_tree_entries_must_be_plain_relative_paths(tmp_path, path):
    with pytest.raises(GuestError, match="is not a plain relative path"):
        write(tmp_path, [TE(kind=TE.FILE, path=path, data=b"x")])


def test_a_guest_symlink_cannot_redirect_later_writes_outside_host_dir(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    with pytest.raises(GuestError, match="'link/pwned' comes before its directory"):
        write(root, [TE(kind=TE.SYMLINK, path="link", target=str(outside)),
                     TE(kind=TE.FILE, path="link/pwned", data=b"x")])
    assert list(outside.iterdir()) == []
    # A DIR entry over an existing symlink replaces the link instead of following it.
    write(root, [TE(kind=TE.DIR, path="link", mode=0o755), TE(kind=TE.FILE, path="link/f", mode=0o644)])
    assert not (root / "link").is_symlink() and (root / "link/f").is_file()
    assert list(outside.iterdir()) == []


def test_a_file_entry_replaces_a_symlink_instead_of_writing_through_it(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").symlink_to(target)
    write(root, [TE(kind=TE.FILE, path="f", mode=0o600, data=b"new")])
    assert target.read_text() == "keep"
    assert (root / "f").read_bytes() == b"new" and oct((root / "f").stat().st_mode & 0o777) == "0o600"


def test_tree_size_and_entry_count_are_bounded(tmp_path):
    with pytest.raises(GuestError, match="exceeds max_bytes=10"):
        write(tmp_path, [TE(kind=TE.FILE, path="f", data=b"123456"), TE(kind=TE.DATA, data=b"789012")],
              max_bytes=10)
    with pytest.raises(GuestError, match="more than max_entries=2"):
        write(tmp_path, [TE(kind=TE.DIR, path=f"d{i}", mode=0o755) for i in range(3)], max_entries=2)
    with pytest.raises(GuestError, match="file data without a file entry"):
        write(tmp_path, [TE(kind=TE.DATA, data=b"x")])


def test_directory_modes_are_applied_after_their_entries(tmp_path):
    write(tmp_path, [TE(kind=TE.DIR, path="ro", mode=0o555), TE(kind=TE.FILE, path="ro/f", mode=0o444, data=b"x")])
    assert oct(os.stat(tmp_path / "ro").st_mode & 0o777) == "0o555"
    assert (tmp_path / "ro/f").read_bytes() == b"x"
    os.chmod(tmp_path / "ro", 0o755)


def test_output_keeps_the_newest_bytes_and_counts_what_was_dropped():
    out = OutputBuffer("stdout", limit=10)
    out.take(0, b"0123456789abcdef")
    assert out.value() == truncation_marker("stdout", 6) + b"6789abcdef"
    out.take(30, b"XY")  # the guest dropped 16..29 before we asked: the buffer stays contiguous
    assert out.value() == truncation_marker("stdout", 30) + b"XY" and out.end == 32
    out.take(31, b"YZ")  # an overlap is not appended twice
    assert out.value().endswith(b"XYZ") and out.end == 33
