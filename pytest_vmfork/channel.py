"""The control channel's framing: one codec, shared by the host and the guest agent.

The host (pytest_vmfork/vm/agent.py) and the guest agent (guest/vmfork_agent/, which gets
this module copied into its image, like the mailbox codec) exchange protobuf
messages of pytest_vmfork/proto/agent.proto over the ``org.vmfork.ctl``
virtio-serial port, multiplexed by stream id. docs/protocol.md is the
specification; this module is its only implementation.

Every frame is a fixed header and a payload::

    magic "vFc1" | kind u8 | method u8 | reserved u16 | session u32 | stream u32 | length u32 | payload

(little endian). ``session`` is a random id the host picks for each QEMU
process and announces in the system mailbox on every resume; the guest drops
its streams and any half-read frame when the announced session changes (a
fork), and both sides ignore frames of any other session. Stale bytes captured
in a snapshot (a frame half written or half read when the vCPUs stopped)
therefore can never be taken for a frame: a reader that is not at a frame of
its session scans forward to the next magic followed by its session id.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from pytest_vmfork.proto import agent_pb2 as pb

MAGIC = b"vFc1"
HEADER = struct.Struct("<4sBBHIII")
HEADER_SIZE = HEADER.size  # 20

# Frame kinds. Host to guest: CALL opens a stream with its first request
# message; DATA carries further request messages (client-streaming methods);
# END closes the request side; CANCEL abandons the stream. Guest to host: DATA
# carries one reply message of a server-streaming method; END ends the stream
# (its payload: the reply of a method that has one reply); ERROR ends it with
# an ``Error`` message.
CALL, DATA, END, ERROR, CANCEL = 1, 2, 3, 4, 5
KINDS = frozenset((CALL, DATA, END, ERROR, CANCEL))

#: The largest frame payload the guest accepts from the host (an exec's stdin
#: and its argv fit; file content travels in CHUNK-sized messages).
MAX_REQUEST = 8 << 20
#: File content per message, both ways.
CHUNK = 256 << 10


class Method(NamedTuple):
    """One rpc of the ``Agent`` service: its id on the wire is its index there."""

    id: int
    name: str
    request: Any  # message class
    response: Any
    client_streaming: bool
    server_streaming: bool


def _methods() -> dict[str, Method]:
    service = pb.DESCRIPTOR.services_by_name["Agent"]
    return {m.name: Method(m.index, m.name, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name),
                           m.client_streaming, m.server_streaming) for m in service.methods}


#: The service's methods by name, and by wire id.
METHODS = _methods()
BY_ID = {m.id: m for m in METHODS.values()}


class ProtocolError(Exception):
    """The peer broke the framing (a frame of our session too large or of no known kind)."""


class Frame(NamedTuple):
    kind: int
    method: int
    stream: int
    payload: bytes


def encode(kind: int, session: int, stream: int, payload: bytes = b"", method: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, method, 0, session, stream, len(payload)) + payload


class Decoder:
    """Turns received bytes into frames of one session.

    ``session`` 0 adopts the session of the first frame seen (a booting guest
    before its first resume). Bytes that are not a frame of the session are
    skipped (counted in ``skipped``): the reader moves to the next magic. A
    frame of the session longer than ``max_length`` or of an unknown kind
    raises ProtocolError: the peer itself is broken or hostile.
    """

    def __init__(self, session: int, max_length: int) -> None:
        self.session = session
        self.max_length = max_length
        self.buf = bytearray()
        self.skipped = 0

    def reset(self, session: int) -> None:
        """A new session: whatever was half received belongs to the old one."""
        self.session = session
        self.skipped += len(self.buf)
        self.buf.clear()

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        buf = self.buf
        buf += data
        frames = []
        while len(buf) >= HEADER_SIZE:
            magic, kind, method, _, session, stream, length = HEADER.unpack_from(buf)
            if magic != MAGIC or (session != self.session and self.session):
                at = buf.find(MAGIC, 1)
                cut = at if at > 0 else max(len(buf) - len(MAGIC) + 1, 1)
                self.skipped += cut
                del buf[:cut]
                continue
            if kind not in KINDS or length > self.max_length:
                raise ProtocolError(f"a control frame of kind {kind} and {length} bytes "
                                    f"(the limit is {self.max_length})")
            end = HEADER_SIZE + length
            if len(buf) < end:
                break
            self.session = session
            frames.append(Frame(kind, method, stream, bytes(buf[HEADER_SIZE:end])))
            del buf[:end]
        return frames
