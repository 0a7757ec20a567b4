"""The value every caller hands to the audit log, and the receipt it gets back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sandboxsec.audit.events import AuditEvent
from sandboxsec.principal import Principal

__all__ = ["SERVICE_LOG", "AuditReceipt", "AuditRecord", "AuditSink"]

#: The log id of the service's own operations (tenant logs use the tenant id).
SERVICE_LOG = "_service"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One security decision or change, before it is sequenced and hashed.

    ``body`` is written as given (no secrets in it).  ``sensitive`` values (tokens, keys,
    personal data) are never written in clear: the log stores an HMAC of each with the tenant's
    audit key so an auditor holding a value can match it.
    """

    event: AuditEvent
    tenant_id: str | None
    actor_key_id: str | None
    actor_role: str | None
    outcome: str
    reason: str | None = None
    object_ids: Mapping[str, str] = field(default_factory=dict)
    body: Mapping[str, Any] = field(default_factory=dict)
    sensitive: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def by(
        cls,
        actor: Principal | None,
        event: AuditEvent,
        outcome: str,
        *,
        tenant_id: str | None = None,
        reason: str | None = None,
        object_ids: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        sensitive: Mapping[str, str] | None = None,
    ) -> AuditRecord:
        """A record of what ``actor`` did (``None``: the operator at the command line, who has
        no key), in the log of ``tenant_id``, by default the actor's own tenant."""
        if tenant_id is None and actor is not None:
            tenant_id = actor.tenant_id
        return cls(
            event=event,
            tenant_id=tenant_id,
            actor_key_id=actor.key_id if actor is not None else None,
            actor_role=str(actor.role) if actor is not None else "operator",
            outcome=outcome,
            reason=reason,
            object_ids=dict(object_ids or {}),
            body=dict(body or {}),
            sensitive=dict(sensitive or {}),
        )


@dataclass(frozen=True, slots=True)
class AuditReceipt:
    """Proof of a durable append: the log it went to and its sequence number there.

    ``pending``: the record was committed as an append intent with the caller's transaction
    and gets its sequence number when sequenced (``seq`` is then -1).
    """

    log_id: str
    seq: int
    pending: bool = False


class AuditSink(Protocol):
    """Appends records durably; raises ``AuditUnavailableError`` (fail closed) when it cannot."""

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt: ...
