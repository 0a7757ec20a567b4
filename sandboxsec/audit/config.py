"""The audit log's settings, as a small frozen value built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

__all__ = ["AuditConfig"]


@dataclass(frozen=True, slots=True)
class AuditConfig:
    """Origin line prefix, checkpoint cadence and how long an append may wait."""

    origin: str
    checkpoint_every: int
    checkpoint_seconds: float
    write_timeout_seconds: float
    #: Appends inside a caller's transaction leave intents sequenced in batches afterwards
    #: (no head lock held by callers); None: on PostgreSQL, where several nodes share a log.
    deferred: bool | None = None

    @property
    def checkpoint_period(self) -> timedelta:
        """How long a log may go with unsigned entries before a checkpoint is signed."""
        return timedelta(seconds=self.checkpoint_seconds)

    def origin_of(self, log_id: str) -> str:
        """The checkpoint origin line of a log: ``<origin>/<log id>``."""
        return f"{self.origin}/{log_id}"
