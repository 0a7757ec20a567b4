"""Table: agent sessions, started only from an affirming attestation."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["AgentSession", "SessionProof"]


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
    # The RFC 7638 thumbprint of the TPM-held session key (``cnf.jkt`` of the token that
    # started the session); every request in the session carries a proof by that key.
    key_thumbprint: str | None = Field(default=None, max_length=64)
    ended_by: str | None = Field(default=None, max_length=40)


class SessionProof(SQLModel, table=True):
    """A session proof (DPoP) already used: its key thumbprint and ``jti``, hashed into the
    primary key, so a replay collides in every worker.  Rows are kept until the proof could
    no longer pass the freshness window, then purged."""

    __tablename__ = "session_proofs"

    id: str = Field(primary_key=True, max_length=64)  # SHA-256 hex of jkt "." jti
    tenant_id: str = Field(index=True, max_length=40)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)
