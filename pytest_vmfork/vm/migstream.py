"""Split a QEMU migration stream into a RAM file and a device-state stream.

A template's RAM lives in a *shared* file, so its saved device state leaves
RAM out (``x-ignore-shared``). A fork maps its RAM *privately*: QEMU sends
every page of it in the migration stream, because x-ignore-shared skips only
shared blocks. To make a running fork into a snapshot like the template's,
:func:`split` reads that full stream once and writes

- the RAM block's pages into a new ``memory.ram`` at their offsets (zero pages
  stay holes: the file is sparse), and
- everything else, byte for byte, into ``state.bin``, minus the RAM block's
  pages: exactly the stream an x-ignore-shared save of a shared block makes
  (the block list with its guest addresses, the small ROM blocks' pages, the
  devices), which forks then load over the privately mapped new RAM file.

The format is QEMU's precopy stream (migration/savevm.c, migration/ram.c):
header and configuration, the ``ram`` section (START, PART..., END; each a
list of ``be64 offset|flags`` entries ending in EOS, then a section footer),
then the devices' FULL sections, which are copied through unparsed. Anything
this parser does not know (compressed pages, XBZRLE, multifd) is refused
rather than guessed at: those capabilities are never enabled by pytest-vmfork.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from pytest_vmfork.errors import VMForkError

PAGE = 4096
FLAG_ZERO, FLAG_MEM_SIZE, FLAG_PAGE, FLAG_EOS, FLAG_CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
FLAGS_UNSUPPORTED = 0x01 | 0x40 | 0x80 | 0x100 | 0x200  # FULL, XBZRLE, HOOK, COMPRESS, MULTIFD_FLUSH
SECTION_START, SECTION_PART, SECTION_END, SECTION_FOOTER = 0x01, 0x02, 0x03, 0x7E
HEADER_LIMIT = 64 * 1024  # header + configuration come first and are tiny
CHUNK = 1 << 20  # reads from the stream
RUN_LIMIT = 1 << 20  # coalesce contiguous pages into writes of up to this size
_RAM_START = re.compile(rb"\x01(.{4})\x03ram\x00\x00\x00\x00(.{4})", re.DOTALL)
_BE64, _BE32 = struct.Struct(">Q"), struct.Struct(">I")


class StreamError(VMForkError):
    """The migration stream is not one this module can split."""


@dataclass
class SplitStats:
    pages: int = 0  # pages of the RAM block written to the RAM file
    zero_pages: int = 0  # left as holes
    state_bytes: int = 0
    stream_bytes: int = 0


class _Buf:
    """Exact reads out of large chunks of the source (one Python call per field)."""

    def __init__(self, src: BinaryIO) -> None:
        self.src = src
        self.buf = b""
        self.pos = 0
        self.total = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            self._fill(n)
            end = n
        data = self.buf[self.pos:end]
        self.pos = end
        return data

    def _fill(self, n: int) -> None:
        parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        while have < n:
            chunk = self.src.read(max(CHUNK, n - have))
            if not chunk:
                raise StreamError(f"migration stream ended early (after {self.total} bytes)")
            parts.append(chunk)
            have += len(chunk)
            self.total += len(chunk)
        self.buf, self.pos = b"".join(parts), 0

    def rest(self) -> Iterator[bytes]:
        if self.pos < len(self.buf):
            yield self.buf[self.pos:]
        self.buf, self.pos = b"", 0
        while chunk := self.src.read(CHUNK):
            self.total += len(chunk)
            yield chunk


def split(src: BinaryIO, state: BinaryIO, ram_fd: int, *, block: str, block_size: int) -> SplitStats:
    """Read the stream from ``src``; write ``block``'s pages to ``ram_fd`` (an
    fd of a file truncated to ``block_size``) and the rest to ``state``."""
    stats = SplitStats()
    pending = _Buf(src)
    take = pending.take
    head = b""
    while (m := _RAM_START.search(head)) is None:  # header and configuration: copied as they are
        if len(head) >= HEADER_LIMIT:
            raise StreamError(f"no RAM section in the first {HEADER_LIMIT} bytes of the migration stream")
        head += take(1)
    section_id = m.group(1)
    if head[:4] != b"QEVM":
        raise StreamError("not a QEMU migration stream (no QEVM magic)")
    out = _Writer(state)
    out.put(head)
    ours = block.encode()
    runs = _RunWriter(ram_fd, block_size)
    last_out_block: bytes | None = None  # block of the last entry written to ``state``
    current: bytes | None = None  # block of the last entry read
    while True:  # one ram section's entries, then its footer
        value = _BE64.unpack(take(8))[0]
        flags, addr = value & (PAGE - 1), value & ~(PAGE - 1)
        if flags & FLAGS_UNSUPPORTED:
            raise StreamError(f"unsupported RAM entry flags {flags:#x} (compression, XBZRLE or multifd?)")
        if flags & FLAG_MEM_SIZE:
            out.put(_BE64.pack(value))
            left = addr
            while left > 0:  # the block list: name, length, guest address (x-ignore-shared)
                n = take(1)
                name = take(n[0])
                length = take(8)
                gpa = take(8)
                out.put(n + name + length + gpa)
                left -= _BE64.unpack(length)[0]
            continue
        if flags & FLAG_EOS:
            out.put(_BE64.pack(value))
            footer = take(5)
            if footer[0] != SECTION_FOOTER or footer[1:] != section_id:
                raise StreamError("RAM section without its footer (a machine type without section footers?)")
            out.put(footer)
            nxt = take(1)
            if nxt[0] in (SECTION_PART, SECTION_END):
                sid = take(4)
                if sid != section_id:
                    raise StreamError("an iterable section other than RAM in the migration stream")
                out.put(nxt + sid)
                last_out_block = None  # be explicit about the block in every section
                continue
            else:
                out.put(nxt)
            break  # the devices follow: copied through
        if not flags & (FLAG_ZERO | FLAG_PAGE):
            raise StreamError(f"unknown RAM entry flags {flags:#x}")
        if not flags & FLAG_CONTINUE:
            n = take(1)
            current = take(n[0])
        elif current is None:
            raise StreamError("RAM entry continues a block that was never named")
        body = take(1 if flags & FLAG_ZERO else PAGE)
        if current == ours:
            if addr + PAGE > block_size:
                raise StreamError(f"page at {addr:#x} is outside the {block_size}-byte block {block!r}")
            if flags & FLAG_ZERO and body == b"\x00":
                runs.hole(addr)
                stats.zero_pages += 1
            else:
                runs.page(addr, body * PAGE if flags & FLAG_ZERO else body)
                stats.pages += 1
            continue
        if current == last_out_block:
            out.put(_BE64.pack(addr | (flags | FLAG_CONTINUE)) + body)
        else:
            out.put(_BE64.pack(addr | (flags & ~FLAG_CONTINUE)) + bytes([len(current)]) + current + body)
            last_out_block = current
    runs.flush()
    for chunk in pending.rest():
        out.put(chunk)
    stats.state_bytes = out.count
    stats.stream_bytes = pending.total
    return stats


class _Writer:
    def __init__(self, dst: BinaryIO) -> None:
        self.dst = dst
        self.count = 0

    def put(self, data: bytes) -> None:
        self.dst.write(data)
        self.count += len(data)


class _RunWriter:
    """Pages at increasing offsets, written in contiguous runs (few syscalls)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.start = -1
        self.parts: list[bytes] = []
        self.written = bytearray(size // PAGE)  # pages with data in the file

    def page(self, addr: int, data: bytes) -> None:
        self.written[addr // PAGE] = 1
        if self.start >= 0 and addr == self.start + PAGE * len(self.parts) and len(self.parts) * PAGE < RUN_LIMIT:
            self.parts.append(data)
            return
        self.flush()
        self.start, self.parts = addr, [data]

    def hole(self, addr: int) -> None:
        """A zero page: already a hole in the fresh file, unless it was sent before with data."""
        if self.written[addr // PAGE]:
            self.flush()
            os.pwrite(self.fd, bytes(PAGE), addr)
            self.written[addr // PAGE] = 0

    def flush(self) -> None:
        if self.parts:
            data = b"".join(self.parts)
            if os.pwrite(self.fd, data, self.start) != len(data):
                raise StreamError("short write to the RAM file")
            self.parts = []
        self.start = -1
