"""A fork's lifecycle: its states and the one table of the moves between them.

Every state change and every "is this allowed now?" question goes through a
:class:`Lifecycle`, so a call in the wrong state fails the same way wherever it
is made (:class:`~pytest_vmfork.errors.StateError`, naming the state the VM was
in and the one(s) the call needs) and no code path can move a VM somewhere the
table does not allow (a closed VM never runs again).

::

    starting ──prepare──> loaded ──resume──> running <──resume── paused
                                               └──stop / save──────┘
    any state except closed ──> failed (its QEMU died, a resume failed)
    any state ──> closed (close(); idempotent)
"""

from __future__ import annotations

import enum

from pytest_vmfork.errors import StateError


class VMState(enum.StrEnum):
    """Where a fork is in its life. The values are the strings ``vm.state`` always
    had, so a state compares equal to them and prints the same."""

    STARTING = "starting"  # created; no QEMU yet
    LOADED = "loaded"  # QEMU spawned paused, device state loaded; never resumed
    RUNNING = "running"  # the guest signalled readiness: exec, files, snapshot...
    PAUSED = "paused"  # vCPUs stopped (a save, a payload delivery, snapshot(resume=False))
    FAILED = "failed"  # its QEMU died or a resume failed; only close() is left
    CLOSED = "closed"  # torn down; final


#: The moves allowed from each state (a move to the same state is not a move).
TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    VMState.STARTING: frozenset({VMState.LOADED, VMState.FAILED, VMState.CLOSED}),
    VMState.LOADED: frozenset({VMState.RUNNING, VMState.FAILED, VMState.CLOSED}),
    VMState.RUNNING: frozenset({VMState.PAUSED, VMState.FAILED, VMState.CLOSED}),
    VMState.PAUSED: frozenset({VMState.RUNNING, VMState.FAILED, VMState.CLOSED}),
    VMState.FAILED: frozenset({VMState.CLOSED}),
    VMState.CLOSED: frozenset(),
}


class Lifecycle:
    """The state of one VM (named ``name`` in errors), checked and moved in one place."""

    def __init__(self, name: str, state: VMState = VMState.STARTING) -> None:
        self.name = name
        self.state = state

    def check(self, operation: str, *allowed: VMState) -> None:
        """StateError unless the VM is in one of ``allowed`` (what ``operation`` needs)."""
        if self.state not in allowed:
            raise StateError(operation, self.state.value, tuple(s.value for s in allowed), vm=self.name)

    def can_move(self, to: VMState) -> bool:
        """Whether the table allows a move from the current state to ``to``."""
        return to in TRANSITIONS[self.state]

    def move(self, to: VMState) -> None:
        """Move to ``to``; StateError (naming both states) if the table does not allow it:
        a bug in the engine, never a user's mistake, so it must not pass silently."""
        if to not in TRANSITIONS[self.state]:
            allowed = tuple(s.value for s in VMState if to in TRANSITIONS[s])
            raise StateError(f"move to {to.value}", self.state.value, allowed or ("(no state)",), vm=self.name)
        self.state = to

    def __repr__(self) -> str:
        return f"<Lifecycle {self.name} {self.state.value}>"
