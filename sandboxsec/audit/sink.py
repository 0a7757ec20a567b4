"""What a domain service needs from the audit log: appending records (a one-job Protocol).

Services take an :class:`AuditSink` in their constructor instead of the whole log, so a unit
test can hand them a list-backed fake and the writer stays swappable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sandboxsec.audit.record import AuditReceipt, AuditRecord

__all__ = ["AuditSink"]


class AuditSink(Protocol):
    """Durably appends audit records, in the caller's transaction when ``session`` is given.

    Raises :class:`~sandboxsec.audit.errors.AuditUnavailableError` when it cannot write; the
    caller must then not carry out the action (fail closed).
    """

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        """Append one record."""
        ...

    def append_many(
        self, records: Sequence[AuditRecord], *, session: Any | None = None
    ) -> list[AuditReceipt]:
        """Append records in order, in one transaction."""
        ...
