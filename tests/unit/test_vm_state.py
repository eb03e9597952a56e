"""The fork lifecycle's table (pytest_vmfork/vm/state.py): pure logic, no VM."""

from __future__ import annotations

import itertools

import pytest

from pytest_vmfork import StateError, VMForkError, VMState
from pytest_vmfork.vm.state import TRANSITIONS, Lifecycle

S = VMState
#: The moves a fork makes, written out by hand: the table must say exactly this.
ALLOWED = {
    (S.STARTING, S.LOADED), (S.STARTING, S.FAILED), (S.STARTING, S.CLOSED),
    (S.LOADED, S.RUNNING), (S.LOADED, S.FAILED), (S.LOADED, S.CLOSED),
    (S.RUNNING, S.PAUSED), (S.RUNNING, S.FAILED), (S.RUNNING, S.CLOSED),
    (S.PAUSED, S.RUNNING), (S.PAUSED, S.FAILED), (S.PAUSED, S.CLOSED),
    (S.FAILED, S.CLOSED),
}
PAIRS = list(itertools.product(VMState, VMState))


def test_the_states_are_the_strings_vm_state_always_had() -> None:
    assert [s.value for s in VMState] == ["starting", "loaded", "running", "paused", "failed", "closed"]
    assert VMState.RUNNING == "running" and str(VMState.CLOSED) == "closed" and f"{VMState.PAUSED}" == "paused"
    assert set(TRANSITIONS) == set(VMState)


@pytest.mark.parametrize(("start", "to"), [p for p in PAIRS if p in ALLOWED], ids=lambda s: s.value)
def test_an_allowed_move_changes_the_state(start: VMState, to: VMState) -> None:
    life = Lifecycle("f-1", start)
    assert life.can_move(to)
    life.move(to)
    assert life.state is to


@pytest.mark.parametrize(("start", "to"), [p for p in PAIRS if p not in ALLOWED], ids=lambda s: s.value)
def test_a_forbidden_move_is_a_state_error_naming_both_states(start: VMState, to: VMState) -> None:
    life = Lifecycle("f-1", start)
    assert not life.can_move(to)
    with pytest.raises(StateError) as err:
        life.move(to)
    assert life.state is start  # unchanged
    message = str(err.value)
    assert message.startswith(f"cannot move to {to.value}: VM 'f-1' is {start.value}; "), message
    assert err.value.state == start.value
    sources = [s.value for s in VMState if (s, to) in ALLOWED]
    assert err.value.required == (tuple(sources) or ("(no state)",))


def test_closed_is_final_and_every_state_can_close() -> None:
    assert not TRANSITIONS[VMState.CLOSED]
    assert all(VMState.CLOSED in TRANSITIONS[s] for s in VMState if s is not VMState.CLOSED)


@pytest.mark.parametrize("state", list(VMState), ids=lambda s: s.value)
def test_check_passes_only_in_an_allowed_state(state: VMState) -> None:
    life = Lifecycle("f-1", state)
    if state is VMState.RUNNING:
        life.check("exec", VMState.RUNNING)
        return
    with pytest.raises(StateError, match=rf"^cannot exec: VM 'f-1' is {state.value}; exec needs running$") as err:
        life.check("exec", VMState.RUNNING)
    assert isinstance(err.value, VMForkError)
    assert (err.value.operation, err.value.state, err.value.vm) == ("exec", state.value, "f-1")


def test_check_with_several_states_names_them_all() -> None:
    with pytest.raises(StateError, match=r"^cannot resume: VM 'x' is closed; resume needs loaded or paused$"):
        Lifecycle("x", VMState.CLOSED).check("resume", VMState.LOADED, VMState.PAUSED)
    Lifecycle("x", VMState.PAUSED).check("resume", VMState.LOADED, VMState.PAUSED)


def test_a_new_lifecycle_starts_and_the_fork_path_reaches_running_then_closed() -> None:
    life = Lifecycle("f-2")
    assert life.state is VMState.STARTING
    for to in (S.LOADED, S.RUNNING, S.PAUSED, S.RUNNING, S.FAILED, S.CLOSED):
        life.move(to)
    assert life.state is VMState.CLOSED and "closed" in repr(life)
