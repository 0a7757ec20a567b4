"""Table: agent sessions, started only from an affirming attestation."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["AgentSession"]


class AgentSession(SQLModel, table=True):
    """One agent session in one attested sandbox: which image and which AK it ran on."""

    __tablename__ = "agent_sessions"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    image_name: str = Field(default="", max_length=500)
    image_digest: str = Field(default="", max_length=80)
    ak_name: str = Field(default="", max_length=140)
    attested: bool = Field(default=False)
    attestation_id: str | None = Field(default=None, max_length=80)
    created_by: str = Field(default="", max_length=40)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
