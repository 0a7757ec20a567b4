"""The session liveness rule, written once: a session is live until it ends or expires.

Every domain that acts on behalf of a session (decisions, grant use, trajectory writes) asks
:func:`is_live`; none spells the rule out again.  Pure: values in, a bool out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

__all__ = ["Lifetime", "is_live"]


class Lifetime(Protocol):
    """Anything with a session's end and expiry (a row or a view)."""

    @property
    def ended_at(self) -> datetime | None: ...

    @property
    def expires_at(self) -> datetime: ...


def is_live(session: Lifetime, now: datetime) -> bool:
    """True while ``session`` has not been ended and ``now`` is before its expiry."""
    return session.ended_at is None and now < session.expires_at
