"""The guest's event channel (pytest_vmfork/vm/events.py): its bounds on what the
guest sends, and the errors it raises, over a real socketpair; no VM."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from pytest_vmfork.errors import EventChannelError, QemuTimeout, RestoreError
from pytest_vmfork.vm import qmploop
from pytest_vmfork.vm.events import (
    DOORBELL,
    EVENT_BURST,
    EVENT_RATE_PER_S,
    MAX_EVENT_LINE,
    EventChannel,
    EventLines,
    parse_event,
)

Channel = tuple[EventChannel, socket.socket, list[str]]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_split_across_reads_come_out_whole_and_a_partial_line_waits() -> None:
    lines = EventLines()
    assert lines.feed(b"vmfork-evt event=re") == []
    got = lines.feed(b"ady gen=7\nconsole noise\nvmfork-evt ev")
    assert got == ["vmfork-evt event=ready gen=7", "console noise"]
    assert lines.feed(b"ent=error\n") == ["vmfork-evt event=error"]


def test_an_event_line_longer_than_the_bound_is_an_event_channel_error_naming_it() -> None:
    with pytest.raises(EventChannelError, match=f"event line longer than {MAX_EVENT_LINE} bytes"):
        EventLines().feed(b"vmfork-evt " + b"x" * MAX_EVENT_LINE + b"\n")
    lines = EventLines()  # no newline at all: the partial line is bounded too
    lines.feed(b"x" * MAX_EVENT_LINE)
    with pytest.raises(EventChannelError, match="longer than") as err:
        lines.feed(b"x")
    assert isinstance(err.value, RestoreError) and isinstance(err.value, EOFError)


def test_a_flood_of_lines_is_an_event_channel_error_and_the_bucket_refills_with_time() -> None:
    clock = Clock()
    lines = EventLines(clock)
    assert len(lines.feed(b"noise\n" * EVENT_BURST)) == EVENT_BURST  # the whole burst, at once
    clock.now += 1.0  # a second refills EVENT_RATE_PER_S lines
    assert len(lines.feed(b"noise\n" * int(EVENT_RATE_PER_S))) == int(EVENT_RATE_PER_S)
    with pytest.raises(EventChannelError, match=f"flooded the event channel .*{EVENT_BURST} lines"):
        lines.feed(b"noise\n")


def test_garbage_bytes_are_lines_but_never_events() -> None:
    got = EventLines().feed(b"\xff\xfe\x00vmfork-evt event=ready\n\x1b[2Jvmfork-evt\n")
    assert got == ["\ufffd\ufffd\x00vmfork-evt event=ready", "\x1b[2Jvmfork-evt"]
    assert [parse_event(text) for text in got] == [None, None]
    assert parse_event("vmfork-evt event=ready gen=7 junk =x") == {"event": "ready", "gen": "7", "": "x"}


@pytest.fixture
def channel() -> Iterator[Channel]:
    """A channel over one end of a socketpair; the test plays the guest on the other.
    The owner's part (on_fault: record why, as vmm.QemuProcess does before its kill)."""
    ours, guest = socket.socketpair()
    chan = qmploop.run(EventChannel.open(ours, "unit"))
    faults: list[str] = []

    def on_fault(why: str) -> None:
        faults.append(why)
        chan.fault = f"{why}; cut off"
        guest.close()  # what killing QEMU does to the channel

    qmploop.run(_start(chan, on_fault))
    yield chan, guest, faults
    qmploop.run(chan.close())
    guest.close()


async def _start(chan: EventChannel, on_fault: Callable[[str], None]) -> None:
    chan.start(on_fault)  # on the loop, as vmm.QemuProcess starts it


def test_a_waiter_gets_the_fields_of_the_event_it_asked_for(channel: Channel) -> None:
    chan, guest, _ = channel
    ready = chan.expect(lambda f: f.get("event") == "ready")
    guest.sendall(b"vmfork-evt event=booting\nvmfork-evt event=ready gen=3\n")
    assert chan.wait(ready, 10) == {"event": "ready", "gen": "3"}
    chan.ring_doorbell()
    assert guest.recv(16) == DOORBELL


def test_a_guest_breaking_the_bounds_fails_the_waiter_with_an_event_channel_error(channel: Channel) -> None:
    chan, guest, faults = channel
    ready = chan.expect(lambda f: f.get("event") == "ready")
    guest.sendall(b"y" * (MAX_EVENT_LINE + 1))
    with pytest.raises(EventChannelError, match="event channel closed: the guest sent an event line longer"):
        chan.wait(ready, 10)
    assert faults == [f"the guest sent an event line longer than {MAX_EVENT_LINE} bytes"]
    with pytest.raises(EOFError):  # a waiter registered after the end fails at once
        chan.wait(chan.expect(lambda f: True), 10)


def test_an_event_that_does_not_come_is_a_qemu_timeout_naming_the_vm(channel: Channel) -> None:
    chan, _, _ = channel
    with pytest.raises(QemuTimeout, match="no event from the guest of unit within 0.05s") as err:
        chan.wait(chan.expect(lambda f: True), 0.05)
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, RestoreError)
