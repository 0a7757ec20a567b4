"""The tamper-evident audit log: RFC 9162 Merkle tree, C2SP checkpoints, offline verification.

Services record through an ``AuditSink`` (``append(AuditRecord(...), session=...)``);
auditors verify exports with :func:`sandboxsec.audit.verify.verify_export` (``sandboxsec
audit verify``).  :class:`AuditLog` is imported on first use, so the offline verifier does not
load the database stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import SERVICE_LOG, AuditReceipt, AuditRecord

if TYPE_CHECKING:
    from sandboxsec.audit.log import AuditLog

__all__ = [
    "SERVICE_LOG",
    "AuditEvent",
    "AuditLog",
    "AuditReceipt",
    "AuditRecord",
    "AuditUnavailableError",
]


def __getattr__(name: str) -> Any:
    if name == "AuditLog":
        from sandboxsec.audit.log import AuditLog

        return AuditLog
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
