"""The host's control channel client (pytest_vmfork/vm/agent.py) over a real socketpair,
the test playing the guest agent: its timeouts and faults are GuestErrors; no VM."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pytest_vmfork import channel as ch
from pytest_vmfork.errors import AgentTimeout, GuestError
from pytest_vmfork.vm.agent import AgentClient, ExecTimeout

Pair = tuple[AgentClient, socket.socket, list[str]]


@pytest.fixture
def pair() -> Iterator[Pair]:
    ours, guest = socket.socketpair()
    faults: list[str] = []
    client = AgentClient(ours, "unit", on_fault=faults.append)
    yield client, guest, faults
    client.close()
    guest.close()


def frames_from(guest: socket.socket, session: int, count: int) -> list[ch.Frame]:
    decoder, got = ch.Decoder(session, ch.MAX_REQUEST), []
    guest.settimeout(10)
    while len(got) < count:
        got += decoder.feed(guest.recv(65536))
    return got


def test_a_call_the_guest_never_answers_is_an_agent_timeout_and_is_cancelled(pair: Pair) -> None:
    client, guest, _ = pair
    with pytest.raises(AgentTimeout, match="guest agent Health did not answer within 0.1s") as err:
        client.health(timeout=0.1)
    assert isinstance(err.value, GuestError) and isinstance(err.value, TimeoutError)
    call, cancel = frames_from(guest, client.session, 2)
    assert (call.kind, cancel.kind, cancel.stream) == (ch.CALL, ch.CANCEL, call.stream)


def test_an_exec_the_guest_never_answers_is_an_exec_timeout(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    client, _, _ = pair
    monkeypatch.setattr("pytest_vmfork.vm.agent.EXEC_GRACE_S", 0.1)
    with pytest.raises(ExecTimeout, match=r"\['true'\] did not finish within 0s"):
        client.exec(["true"], timeout=0)


def test_a_guest_that_breaks_the_framing_is_reported_and_fails_the_pending_call(pair: Pair) -> None:
    client, guest, faults = pair

    def guest_agent() -> None:  # takes the call, answers with a frame of no known kind
        (call,) = frames_from(guest, client.session, 1)
        guest.sendall(ch.HEADER.pack(ch.MAGIC, 99, 0, 0, client.session, call.stream, 0))

    threading.Thread(target=guest_agent, daemon=True).start()
    with pytest.raises(GuestError, match="guest agent Health failed: the control channel closed"):
        client.health(timeout=30)
    assert len(faults) == 1 and faults[0].startswith("the guest broke the control channel's framing")
