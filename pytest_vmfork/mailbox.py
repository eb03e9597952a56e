"""The mailbox codec: one layout, shared by the host and the guest agent.

A mailbox is a page-aligned, mlock'ed region of the guest agent's memory. The
host writes a JSON payload into a *fork's private copy* of guest RAM after the
fork's device state is loaded and before its vCPUs run, so the guest finds its
per-fork data in memory the instant it resumes, with no host-to-guest RPC.

The image build copies this very file into the guest (``/opt/vmfork/
pytest_vmfork/mailbox.py``); there is no second copy of the layout to drift.
It therefore imports nothing but the standard library. docs/protocol.md
describes this layout beside the control channel's framing (channel.py).

Layout (little-endian; ``size`` is a multiple of the 4 KiB page)::

    0    magic        8   b"VMFKMBX1"
    8    version      2   LAYOUT_VERSION
    10   header size  2   HEADER_SIZE
    12   size         4   whole mailbox, header included
    16   nonce       16   per-snapshot random bytes
    32   name length  1
    33   name        64   ASCII, zero padded
    97   reserved     7
    --- everything above is the *marker*, fixed when the agent registers ---
    104  length       4   payload bytes
    108  crc32        4   of the payload
    112  sequence     8   generation; written last
    120  reserved     8
    128  payload

Writers store the payload, then length+crc, then the sequence: a reader that
sees a new sequence therefore sees a complete payload (and the host only
writes while the vCPUs are stopped, so a torn read is impossible twice over).
A reader remembers the last sequence it consumed, so a second resume of the
same memory (a new sequence) is delivered again.

Acks travel as one UDP datagram of ``key=value`` tokens, e.g.
``vmfork-ack stage=applied mailbox=app-config gen=7 nonce=…``; they are parsed
into whole fields (never substring matches) by :func:`parse_ack`.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Mapping

MAGIC = b"VMFKMBX1"
LAYOUT_VERSION = 1
HEADER_SIZE = 128
PAGE_SIZE = 4096
NONCE_SIZE = 16
NAME_MAX = 64
DEFAULT_SIZE = PAGE_SIZE
MAX_SIZE = 1024 * 1024
MAX_MAILBOXES = 16  # per fork, user mailboxes
MAX_TEMPLATE_MAILBOXES = 64  # declared per template (each is one mlock'ed guest page)
SYSTEM_MAILBOX = "vmfork"  # built-in: entropy, clock, network handoff
RESERVED_PREFIX = "vmfork"

NAME_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_MARKER_END = 104
_OFF_LENGTH = 104
_OFF_SEQ = 112
_HEAD = struct.Struct("<8sHHI16sB64s7x")  # 104 bytes: the marker
_LEN_CRC = struct.Struct("<II")
_SEQ = struct.Struct("<Q")

ACK_PREFIX = "vmfork-ack"


class MailboxError(ValueError):
    """A mailbox name, payload or memory image is not valid."""


def validate_name(name: object, *, allow_reserved: bool = False) -> str:
    """Return ``name`` if it is a legal mailbox name, else raise MailboxError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MailboxError(
            f"invalid mailbox name {name!r}: use 1-{NAME_MAX} characters from "
            "A-Z a-z 0-9 . _ : -"
        )
    if not allow_reserved and name.startswith(RESERVED_PREFIX):
        raise MailboxError(
            f"invalid mailbox name {name!r}: names starting with {RESERVED_PREFIX!r} "
            "are reserved for pytest-vmfork's built-in mailbox; pick another name"
        )
    return name


def validate_size(size: object) -> int:
    """Mailbox sizes are whole pages so each mailbox owns its pages."""
    if (
        not isinstance(size, int)
        or isinstance(size, bool)
        or size < PAGE_SIZE
        or size > MAX_SIZE
        or size % PAGE_SIZE
    ):
        raise MailboxError(
            f"invalid mailbox size {size!r}: use a multiple of {PAGE_SIZE} "
            f"between {PAGE_SIZE} and {MAX_SIZE} bytes"
        )
    return size


def capacity(size: int) -> int:
    """Payload bytes that fit in a mailbox of ``size`` bytes."""
    return size - HEADER_SIZE


def marker(name: str, nonce: bytes, size: int) -> bytes:
    """The fixed first bytes of a registered mailbox: what the host verifies."""
    raw = name.encode("ascii")
    if len(nonce) != NONCE_SIZE:
        raise MailboxError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return _HEAD.pack(MAGIC, LAYOUT_VERSION, HEADER_SIZE, size, nonce, len(raw), raw)


def initial_image(name: str, nonce: bytes, size: int) -> bytes:
    """The bytes a guest agent writes when it registers an empty mailbox."""
    head = marker(name, nonce, size)
    return head + b"\0" * (size - len(head))


def encode_payload(payload: object, *, size: int = DEFAULT_SIZE, name: str = "?") -> bytes:
    """Serialise a payload (a JSON object) and check it fits the mailbox."""
    if not isinstance(payload, Mapping):
        raise MailboxError(
            f"mailbox {name!r}: payload must be a JSON object (a dict), "
            f"got {type(payload).__name__}"
        )
    try:
        data = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise MailboxError(f"mailbox {name!r}: payload is not JSON-serialisable: {exc}") from exc
    if len(data) > capacity(size):
        raise MailboxError(
            f"mailbox {name!r}: payload is {len(data)} bytes encoded but the mailbox "
            f"holds {capacity(size)} bytes; shrink the payload or declare the mailbox "
            "with a larger size"
        )
    return data


def write_plan(data: bytes, sequence: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) writes in the order that makes a torn read impossible."""
    return [
        (HEADER_SIZE, data),
        (_OFF_LENGTH, _LEN_CRC.pack(len(data), zlib.crc32(data))),
        (_OFF_SEQ, _SEQ.pack(sequence)),
    ]


def apply_plan(buf: bytearray | memoryview, plan: list[tuple[int, bytes]]) -> None:
    """Apply a write plan to an in-process buffer (tests, and the guest's own resets)."""
    for off, chunk in plan:
        buf[off : off + len(chunk)] = chunk


def sequence_of(buf: bytes | bytearray | memoryview) -> int:
    return _SEQ.unpack_from(buf, _OFF_SEQ)[0]


@dataclass(frozen=True)
class Header:
    name: str
    nonce: bytes
    size: int


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Decode and check the marker at the start of ``buf``."""
    if len(buf) < HEADER_SIZE:
        raise MailboxError(f"mailbox image too short: {len(buf)} bytes")
    magic, version, hsize, size, nonce, nlen, raw = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MailboxError(f"bad mailbox magic {bytes(magic)!r}")
    if version != LAYOUT_VERSION or hsize != HEADER_SIZE:
        raise MailboxError(
            f"mailbox layout version {version}/{hsize} is not {LAYOUT_VERSION}/{HEADER_SIZE}: "
            "host and guest were built from different pytest-vmfork versions; rebuild the image"
        )
    if nlen > NAME_MAX:
        raise MailboxError(f"mailbox name length {nlen} exceeds {NAME_MAX}")
    return Header(raw[:nlen].decode("ascii", "replace"), bytes(nonce), size)


@dataclass(frozen=True)
class Delivery:
    sequence: int
    data: bytes

    def json(self) -> Any:
        return json.loads(self.data)


def read(buf: bytes | bytearray | memoryview, last_sequence: int) -> Delivery | None:
    """Return the payload if its sequence is new, None if nothing new arrived.

    Raises MailboxError when a new sequence carries a damaged payload.
    """
    seq = sequence_of(buf)
    if seq == last_sequence:
        return None
    size = len(buf)
    length, crc = _LEN_CRC.unpack_from(buf, _OFF_LENGTH)
    if length > size - HEADER_SIZE:
        raise MailboxError(f"payload length {length} exceeds capacity {size - HEADER_SIZE}")
    data = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
    if zlib.crc32(data) != crc:
        raise MailboxError("payload checksum mismatch")
    if sequence_of(buf) != seq:
        raise MailboxError("mailbox changed while it was read")
    return Delivery(seq, data)


def find(buf: bytes | bytearray | memoryview, want: bytes, start: int = 0) -> int:
    """Page-aligned offset of ``want`` (a full marker) in ``buf``, or -1.

    Only page-aligned hits count: the marker's bytes also occur in the agent's
    own heap and source text, never at the start of a page with the nonce.
    """
    view = memoryview(buf)
    probe = want[:8]
    off = start
    while True:
        off = bytes_find(view, probe, off)
        if off < 0:
            return -1
        if off % PAGE_SIZE == 0 and bytes(view[off : off + len(want)]) == want:
            return off
        off += 1


def bytes_find(view: memoryview, probe: bytes, start: int) -> int:
    obj = view.obj
    if isinstance(obj, (bytes, bytearray)) or hasattr(obj, "find"):
        return obj.find(probe, start)  # type: ignore[union-attr]
    return bytes(view).find(probe, start)


# --- acks -----------------------------------------------------------------

_TOKEN_RE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_VALUE_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{0,128}$")


def format_ack(**fields: object) -> bytes:
    """One ack datagram: ``vmfork-ack k=v k=v``. Values must be token-safe."""
    parts = [ACK_PREFIX]
    for key, value in fields.items():
        text = str(value)
        if not _TOKEN_RE.match(key) or not _VALUE_RE.match(text):
            raise MailboxError(f"ack field {key}={text!r} is not token-safe")
        parts.append(f"{key}={text}")
    return " ".join(parts).encode("ascii")


def parse_ack(datagram: bytes) -> dict[str, str] | None:
    """Parse an ack into whole fields; None for anything that is not one.

    Exact parsing is the point: ``ip=10.0.0.1`` must never match
    ``ip=10.0.0.10``, and stray traffic must not count as an ack.
    """
    try:
        text = datagram.decode("ascii")
    except UnicodeDecodeError:
        return None
    tokens = text.strip().split(" ")
    if not tokens or tokens[0] != ACK_PREFIX:
        return None
    fields: dict[str, str] = {}
    for tok in tokens[1:]:
        key, sep, value = tok.partition("=")
        if not sep or not _TOKEN_RE.match(key) or not _VALUE_RE.match(value) or key in fields:
            return None
        fields[key] = value
    return fields
