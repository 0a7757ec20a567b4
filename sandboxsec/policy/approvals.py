"""The approval request state machine, pure: states, legal transitions and the approver's check.

::

    pending --approve--> approved --consume--> consumed
       |  \\--deny-----> denied
       \\----expire----> expired

A pending request whose ``expires_at`` has passed is expired whatever its stored state says;
:func:`effective_state` reads it that way so no caller can approve it in the gap before the
expiry is written.  The storage layer applies a transition with a conditional update on the
*from* state, so two concurrent callers cannot both win.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from enum import StrEnum

from sandboxsec.policy.errors import (
    ApprovalExpiredError,
    ApprovalHashMismatchError,
    ApprovalNotPendingError,
)

__all__ = [
    "ApprovalEvent",
    "ApprovalState",
    "check_decision",
    "effective_state",
    "transition",
]


class ApprovalState(StrEnum):
    """Where an approval request stands."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CONSUMED = "consumed"


class ApprovalEvent(StrEnum):
    """What can happen to an approval request."""

    APPROVE = "approve"
    DENY = "deny"
    EXPIRE = "expire"
    CONSUME = "consume"


_TRANSITIONS: dict[tuple[ApprovalState, ApprovalEvent], ApprovalState] = {
    (ApprovalState.PENDING, ApprovalEvent.APPROVE): ApprovalState.APPROVED,
    (ApprovalState.PENDING, ApprovalEvent.DENY): ApprovalState.DENIED,
    (ApprovalState.PENDING, ApprovalEvent.EXPIRE): ApprovalState.EXPIRED,
    (ApprovalState.APPROVED, ApprovalEvent.CONSUME): ApprovalState.CONSUMED,
}


def effective_state(state: ApprovalState, expires_at: datetime, now: datetime) -> ApprovalState:
    """The state as of ``now``: a pending request at or past its expiry is expired."""
    if state is ApprovalState.PENDING and now >= expires_at:
        return ApprovalState.EXPIRED
    return state


def transition(
    state: ApprovalState, event: ApprovalEvent, *, expires_at: datetime, now: datetime
) -> ApprovalState:
    """The state after ``event``; raises ``ApprovalExpiredError`` or ``ApprovalNotPendingError``."""
    current = effective_state(state, expires_at, now)
    if event is ApprovalEvent.EXPIRE:
        # Expiring is the one event that needs the stored state, not the effective one.
        current = state
    elif current is ApprovalState.EXPIRED and state is ApprovalState.PENDING:
        raise ApprovalExpiredError("the approval request expired before it was decided")
    new = _TRANSITIONS.get((current, event))
    if new is None:
        if current is ApprovalState.EXPIRED:
            raise ApprovalExpiredError("the approval request has expired")
        raise ApprovalNotPendingError(f"the approval request is {current.value}, not pending")
    return new


def check_decision(
    *,
    state: ApprovalState,
    event: ApprovalEvent,
    expires_at: datetime,
    now: datetime,
    shown_params_hash: str,
    params_hash: str,
) -> ApprovalState:
    """The approver's approve/deny, checked in order; returns the new state.

    1. the request is still pending and not expired;
    2. the params_hash the approver was shown equals the request's (a person never approves
       something other than what their screen showed).
    """
    if event not in (ApprovalEvent.APPROVE, ApprovalEvent.DENY):
        raise ValueError("an approver can only approve or deny")
    # 1. state and expiry
    new = transition(state, event, expires_at=expires_at, now=now)
    # 2. what was shown is what is decided
    if not hmac.compare_digest(shown_params_hash.encode(), params_hash.encode()):
        raise ApprovalHashMismatchError(
            "params_hash does not match the request: reload it and check what you approve"
        )
    return new
