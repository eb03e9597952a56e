"""The migration stream splitter on synthetic streams in QEMU 7.2's precopy format.

(The real thing is covered by the layer tests in tests/vm: every fork of a
layer loads a state.bin this wrote.)"""

from __future__ import annotations

import io
import os
import struct

import pytest

from pytest_vmfork.vm import migstream as ms

PAGE = 4096
SID = struct.pack(">I", 2)
HEADER = (b"QEVM" + struct.pack(">I", 3) + b"\x07" + struct.pack(">I", 10) + b"pc-q35-7.2"
          + b"\x05\x1aconfiguration/capabilities" + struct.pack(">I", 1) + b"\x0fx-ignore-shared")
DEVICES = b"\x04" + struct.pack(">I", 3) + b"\x05timer" + bytes(8) + b"device-bytes" + b"\x7e" + struct.pack(">I", 3)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def named(block: bytes) -> bytes:
    return bytes([len(block)]) + block


def entry(addr: int, flags: int, block: bytes | None, body: bytes) -> bytes:
    return be64(addr | flags | (ms.FLAG_CONTINUE if block is None else 0)) + (named(block) if block else b"") + body


def stream(sections: list[bytes]) -> tuple[bytes, bytes]:
    """(full stream, the state.bin it must become) for RAM sections of entries."""
    blocks = named(b"ram0") + be64(4 * PAGE) + be64(0) + named(b"pc.bios") + be64(PAGE) + be64(0xFFFC0000)
    start = b"\x01" + SID + b"\x03ram" + bytes(4) + struct.pack(">I", 4)
    first = be64((5 * PAGE) | ms.FLAG_MEM_SIZE) + blocks
    full, state = HEADER + start + first, HEADER + start + first
    for i, (entries, expect) in enumerate(sections):
        if i:
            full += b"\x02" + SID
            state += b"\x02" + SID
        full += entries + be64(ms.FLAG_EOS) + b"\x7e" + SID
        state += expect + be64(ms.FLAG_EOS) + b"\x7e" + SID
    return full + DEVICES, state + DEVICES


def split(data: bytes, tmp_path) -> tuple[bytes, bytes, ms.SplitStats]:
    out = io.BytesIO()
    fd = os.open(tmp_path / "memory.ram", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 4 * PAGE)
        stats = ms.split(io.BytesIO(data), out, fd, block="ram0", block_size=4 * PAGE)
    finally:
        os.close(fd)
    return out.getvalue(), (tmp_path / "memory.ram").read_bytes(), stats


def test_the_ram_block_s_pages_go_to_the_file_and_everything_else_to_the_state(tmp_path):
    a, b, bios = b"A" * PAGE, b"B" * PAGE, b"S" * PAGE
    sections = [
        (entry(0, ms.FLAG_PAGE, b"ram0", a) + entry(PAGE, ms.FLAG_ZERO, None, b"\x00")
         + entry(0, ms.FLAG_PAGE, b"pc.bios", bios) + entry(3 * PAGE, ms.FLAG_PAGE, b"ram0", b),
         entry(0, ms.FLAG_PAGE, b"pc.bios", bios)),
        # pc.bios continues a block whose entries were dropped: it must name its block again
        (entry(2 * PAGE, ms.FLAG_PAGE, b"ram0", b) + entry(0, ms.FLAG_ZERO, b"pc.bios", b"\x00")
         + entry(PAGE, ms.FLAG_ZERO, None, b"\x00"),
         entry(0, ms.FLAG_ZERO, b"pc.bios", b"\x00") + entry(PAGE, ms.FLAG_ZERO, None, b"\x00")),
    ]
    full, expect = stream(sections)
    state, ram, stats = split(full, tmp_path)
    assert state == expect
    assert ram == a + bytes(PAGE) + b + b
    assert (stats.pages, stats.zero_pages, stats.stream_bytes, stats.state_bytes) == (3, 1, len(full), len(expect))


def test_a_page_sent_again_as_zero_is_cleared(tmp_path):
    full, _ = stream([(entry(0, ms.FLAG_PAGE, b"ram0", b"x" * PAGE) + entry(0, ms.FLAG_ZERO, None, b"\x00"), b"")])
    assert split(full, tmp_path)[1] == bytes(4 * PAGE)


@pytest.mark.parametrize("flags, why", [(0x100, "unsupported"), (0x40, "unsupported"), (0x800, "unknown")])
def test_entries_it_does_not_know_are_refused(tmp_path, flags, why):
    full, _ = stream([(entry(0, flags, b"ram0", b""), b"")])
    with pytest.raises(ms.StreamError, match=why):
        split(full, tmp_path)


def test_a_truncated_stream_or_a_page_outside_the_block_is_refused(tmp_path):
    full, _ = stream([(entry(0, ms.FLAG_PAGE, b"ram0", b"x" * PAGE), b"")])
    with pytest.raises(ms.StreamError, match="ended early"):
        split(full[: len(HEADER) + 60], tmp_path)
    full, _ = stream([(entry(4 * PAGE, ms.FLAG_PAGE, b"ram0", b"x" * PAGE), b"")])
    with pytest.raises(ms.StreamError, match="outside"):
        split(full, tmp_path)
    with pytest.raises(ms.StreamError, match="no RAM section"):
        split(b"QEVM" + bytes(ms.HEADER_LIMIT + 10), tmp_path)
