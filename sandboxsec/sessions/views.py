"""What the sessions domain hands out: frozen views, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sandboxsec.sessions.models import AgentSession

__all__ = ["SessionView"]


@dataclass(frozen=True, slots=True)
class SessionView:
    """An agent session: the image and AK it was attested on, and its lifetime."""

    id: str
    tenant_id: str
    image_name: str
    image_digest: str
    ak_name: str
    attested: bool
    attestation_id: str | None
    created_by: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    key_thumbprint: str | None = None  # RFC 7638 thumbprint of the TPM-held session key

    @classmethod
    def of(cls, row: AgentSession) -> SessionView:
        """The view of a stored session row."""
        return cls(row.id, row.tenant_id, row.image_name, row.image_digest, row.ak_name,
                   bool(row.attested), row.attestation_id, row.created_by, row.created_at,
                   row.expires_at, row.ended_at, row.key_thumbprint)
