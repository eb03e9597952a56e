"""Per-fork mailbox payloads: checked and encoded before any VM is touched.

``fork(mailboxes=...)`` and ``vm.deliver(...)`` take a dict of mailbox name to a
JSON object or a :class:`MailboxPayload` (the payload plus delivery options).
Everything a payload can get wrong (an unknown mailbox, too large, not JSON, a bad
ack timeout) is a ConfigError here, so a bad request never costs a restore.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pytest_vmfork import mailbox as mbx
from pytest_vmfork.errors import ConfigError
from pytest_vmfork.vm.snapshot import Snapshot, require_mailboxes

MAX_ACK_TIMEOUT = 60.0


@dataclass(frozen=True)
class MailboxPayload:
    """A payload plus delivery options, for ``fork(mailboxes={name: MailboxPayload(...)})``.

    With ``wait_for_ack`` the fork is ready only once the guest acknowledged the
    payload over UDP (by default the agent acks on delivery; a template can
    leave that to a guest program, see Template.guest_acked_mailboxes).
    """

    payload: Any
    wait_for_ack: bool = False
    ack_timeout: float = 2.0


def prepare_mailboxes(
    snapshot: Snapshot, payloads: Mapping[str, Any] | None
) -> tuple[dict[str, bytes], dict[str, float]]:
    """Validate and encode user payloads before any VM is touched.

    Returns the encoded payloads and, for those that wait for an ack, the timeout.
    """
    if not payloads:
        return {}, {}
    if not isinstance(payloads, Mapping):
        raise ConfigError(f"mailboxes must be a dict of name -> JSON object, got {type(payloads).__name__}")
    if len(payloads) > mbx.MAX_MAILBOXES:
        raise ConfigError(
            f"{len(payloads)} mailboxes requested for one fork; at most {mbx.MAX_MAILBOXES} are allowed"
        )
    encoded, acks = {}, {}
    for name, value in payloads.items():
        item = value if isinstance(value, MailboxPayload) else MailboxPayload(value)
        try:
            mbx.validate_name(name)
            encoded[name] = mbx.encode_payload(item.payload, name=name)
        except mbx.MailboxError as exc:
            raise ConfigError(str(exc)) from exc
        if not isinstance(item.wait_for_ack, bool):
            raise ConfigError(f"mailbox {name!r}: wait_for_ack must be True or False")
        timeout = item.ack_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_ACK_TIMEOUT:
            raise ConfigError(
                f"mailbox {name!r}: ack_timeout={timeout!r} must be a number of seconds from 0 to {MAX_ACK_TIMEOUT:g}"
            )
        if item.wait_for_ack:
            acks[name] = float(timeout)
    require_mailboxes(snapshot, list(encoded))
    return encoded, acks
