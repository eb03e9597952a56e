"""The control channel's framing (pytest_vmfork/channel.py, docs/protocol.md): pure logic, no VM."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_vmfork import channel as ch
from pytest_vmfork.proto import agent_pb2 as pb

SESSION, OLD = 0x1234_5678, 0x0BAD_0001


def frame(kind: int = ch.CALL, stream: int = 1, payload: bytes = b"", session: int = SESSION,
          method: int = 0) -> bytes:
    return ch.encode(kind, session, stream, payload, method)


def test_every_method_of_the_schema_has_a_wire_id_and_message_types():
    assert [m.id for m in sorted(ch.METHODS.values())] == list(range(len(ch.METHODS)))
    exec_ = ch.METHODS["Exec"]
    assert (exec_.request, exec_.response) == (pb.ExecRequest, pb.ExecResponse)
    assert ch.METHODS["PutFile"].client_streaming and not ch.METHODS["PutFile"].server_streaming
    assert ch.METHODS["Shell"].client_streaming and ch.METHODS["Shell"].server_streaming
    assert ch.BY_ID[exec_.id] is exec_


def test_frames_split_anywhere_come_out_whole_and_in_order():
    wire = b"".join(frame(ch.DATA, s, bytes([s]) * s * 100) for s in range(1, 6))
    d = ch.Decoder(SESSION, 1 << 20)
    got = []
    for i in range(0, len(wire), 7):
        got += d.feed(wire[i : i + 7])
    assert [(f.stream, f.payload) for f in got] == [(s, bytes([s]) * s * 100) for s in range(1, 6)]
    assert d.skipped == 0 and not d.buf


def test_stale_bytes_of_an_old_session_and_half_frames_are_skipped_never_taken():
    # What a snapshot may hold: the tail of a frame, whole frames of the old session,
    # a header cut short. None of it may be read as a frame of the new session.
    half = frame(ch.DATA, 9, b"x" * 50, session=OLD)[30:]
    stale = half + frame(ch.END, 3, b"old", session=OLD) + ch.MAGIC + b"\x01\x00"
    d = ch.Decoder(SESSION, 1 << 20)
    got = d.feed(stale + frame(ch.CALL, 1, b"new", method=2))
    assert got == [ch.Frame(ch.CALL, 2, 1, b"new")]
    assert d.skipped == len(stale)


def test_a_payload_that_looks_like_a_header_of_another_session_is_data():
    inner = frame(ch.CALL, 7, b"", session=OLD)
    d = ch.Decoder(SESSION, 1 << 20)
    assert d.feed(frame(ch.DATA, 1, inner)) == [ch.Frame(ch.DATA, 0, 1, inner)]


def test_a_booting_guest_adopts_the_first_session_and_a_resume_resets_it():
    d = ch.Decoder(0, 1 << 20)
    d.feed(frame(ch.CALL, 1, b"a"))
    assert d.session == SESSION
    d.feed(frame(ch.DATA, 1, b"b" * 100)[:40])  # half a frame when the snapshot was taken
    d.reset(0x7777_0001)
    assert d.feed(frame(ch.CALL, 1, b"fresh", session=0x7777_0001)) == [ch.Frame(ch.CALL, 0, 1, b"fresh")]
    assert d.feed(frame(ch.CALL, 2, b"late", session=SESSION)) == []  # the old session's host is gone


def test_an_oversized_or_unknown_frame_of_the_session_is_a_protocol_error():
    d = ch.Decoder(SESSION, 1000)
    with pytest.raises(ch.ProtocolError, match="1001 bytes"):
        d.feed(ch.HEADER.pack(ch.MAGIC, ch.DATA, 0, 0, SESSION, 1, 1001))
    with pytest.raises(ch.ProtocolError, match="kind 99"):
        ch.Decoder(SESSION, 1000).feed(ch.HEADER.pack(ch.MAGIC, 99, 0, 0, SESSION, 1, 0))


@given(st.binary(max_size=300), st.lists(st.binary(max_size=64), max_size=5))
def test_garbage_before_the_session_s_frames_never_hides_or_invents_one(garbage, payloads):
    d = ch.Decoder(SESSION, 1 << 16)
    wire = garbage + b"".join(frame(ch.DATA, i + 1, p) for i, p in enumerate(payloads))
    assert [(f.stream, f.payload) for f in d.feed(wire)] == [(i + 1, p) for i, p in enumerate(payloads)]
