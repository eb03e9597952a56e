"""The mailbox codec shared by host and guest: layout, validation, acks."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_vmfork import mailbox as mbx

NONCE = bytes(range(16))
names = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z").filter(lambda n: not n.startswith("vmfork"))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


@given(name=names, payload=st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_payload_round_trips_through_a_registered_mailbox(name, payload):
    img = bytearray(mbx.initial_image(name, NONCE, mbx.PAGE_SIZE))
    try:
        data = mbx.encode_payload(payload, name=name)
    except mbx.MailboxError:
        return  # too large for one page: covered by the size test
    mbx.apply_plan(img, mbx.write_plan(data, 7))
    header = mbx.parse_header(img)
    assert (header.name, header.nonce, header.size) == (name, NONCE, mbx.PAGE_SIZE)
    got = mbx.read(img, 0)
    assert got is not None and got.sequence == 7 and got.json() == json.loads(json.dumps(payload))


@given(data=st.binary(max_size=mbx.capacity(mbx.PAGE_SIZE)), seq=st.integers(1, 2**63))
def test_arbitrary_bytes_survive_the_write_plan(data, seq):
    img = bytearray(mbx.initial_image("x", NONCE, mbx.PAGE_SIZE))
    mbx.apply_plan(img, mbx.write_plan(data, seq))
    got = mbx.read(img, 0)
    assert got is not None and got.data == data and got.sequence == seq


def test_sequence_is_written_last_so_a_partial_write_is_never_seen():
    img = bytearray(mbx.initial_image("x", NONCE, mbx.PAGE_SIZE))
    plan = mbx.write_plan(b'{"a":1}', 3)
    assert plan[-1][0] == 112 and len(plan[-1][1]) == 8  # sequence field
    mbx.apply_plan(img, plan[:-1])
    assert mbx.read(img, 0) is None  # payload and length written, sequence not yet


def test_same_sequence_is_not_delivered_twice_but_a_new_one_is():
    img = bytearray(mbx.initial_image("x", NONCE, mbx.PAGE_SIZE))
    mbx.apply_plan(img, mbx.write_plan(b"{}", 1))
    assert mbx.read(img, 1) is None
    mbx.apply_plan(img, mbx.write_plan(b'{"b":2}', 2))
    assert mbx.read(img, 1).data == b'{"b":2}'


def test_corrupted_payload_is_rejected_by_checksum():
    img = bytearray(mbx.initial_image("x", NONCE, mbx.PAGE_SIZE))
    mbx.apply_plan(img, mbx.write_plan(b'{"a":1}', 1))
    img[mbx.HEADER_SIZE] ^= 0xFF
    with pytest.raises(mbx.MailboxError, match="checksum"):
        mbx.read(img, 0)


@pytest.mark.parametrize("name", ["", "a" * 65, "bad name", "slash/no", "ümlaut", 7])
def test_invalid_names_are_rejected_with_the_rule(name):
    with pytest.raises(mbx.MailboxError, match="invalid mailbox name"):
        mbx.validate_name(name)


def test_reserved_prefix_is_rejected():
    with pytest.raises(mbx.MailboxError, match="reserved"):
        mbx.validate_name("vmfork-net")


def test_64_character_name_fits_the_marker():
    name = "n" * 64
    assert mbx.parse_header(mbx.initial_image(name, NONCE, mbx.PAGE_SIZE)).name == name


def test_oversized_payload_error_names_both_sizes():
    payload = {"blob": "x" * 5000}
    with pytest.raises(mbx.MailboxError) as exc:
        mbx.encode_payload(payload, name="cfg")
    msg = str(exc.value)
    assert "5011 bytes" in msg and f"{mbx.capacity(mbx.PAGE_SIZE)} bytes" in msg and "'cfg'" in msg


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, None])
def test_payload_must_be_a_json_object(payload):
    with pytest.raises(mbx.MailboxError, match="must be a JSON object"):
        mbx.encode_payload(payload, name="cfg")


def test_find_only_accepts_page_aligned_marker_with_nonce():
    want = mbx.marker("cfg", NONCE, mbx.PAGE_SIZE)
    mem = bytearray(4 * mbx.PAGE_SIZE)
    mem[100 : 100 + len(want)] = want  # unaligned copy (heap string)
    other = mbx.marker("cfg", b"\x01" * 16, mbx.PAGE_SIZE)
    mem[mbx.PAGE_SIZE : mbx.PAGE_SIZE + len(other)] = other  # aligned, wrong nonce
    assert mbx.find(mem, want) == -1
    mem[3 * mbx.PAGE_SIZE : 3 * mbx.PAGE_SIZE + len(want)] = want
    assert mbx.find(mem, want) == 3 * mbx.PAGE_SIZE


def test_ack_parses_whole_fields_only():
    ack = mbx.format_ack(stage="applied", mailbox="cfg", gen=12, ip="10.0.0.10")
    fields = mbx.parse_ack(ack)
    assert fields == {"stage": "applied", "mailbox": "cfg", "gen": "12", "ip": "10.0.0.10"}
    assert fields["ip"] != "10.0.0.1"


@pytest.mark.parametrize(
    "datagram",
    [
        b"stage=applied mailbox=cfg",  # no prefix
        b"vmfork-ack stage=applied stage=failed",  # duplicate key
        b"vmfork-ack stage",  # not key=value
        b"vmfork-ack stage=app\xffed",  # not ASCII
        b"xvmfork-ack stage=applied",
    ],
)
def test_malformed_acks_are_not_acks(datagram):
    assert mbx.parse_ack(datagram) is None
