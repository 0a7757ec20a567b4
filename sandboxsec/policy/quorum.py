"""Counting passkey-signed votes on one approval request (pure).

One deny decides deny at once; approval needs ``quorum`` distinct people.  Each person votes
at most once (the store enforces it with a unique key), so counting rows counts people.
"""

from __future__ import annotations

from collections.abc import Iterable

from sandboxsec.policy.approvals import ApprovalState

__all__ = ["tally"]


def tally(votes: Iterable[tuple[str, str]], quorum: int) -> ApprovalState | None:
    """The state the votes decide (``approved`` / ``denied``), or ``None`` while short.

    ``votes`` are ``(person_id, decision)`` pairs, decision ``approve`` or ``deny``.
    """
    if quorum < 1:
        raise ValueError("a quorum is at least 1")
    approvers: set[str] = set()
    for person_id, decision in votes:
        if decision == "deny":
            return ApprovalState.DENIED
        if decision != "approve":
            raise ValueError(f"unknown vote {decision!r}")
        approvers.add(person_id)
    return ApprovalState.APPROVED if len(approvers) >= quorum else None
