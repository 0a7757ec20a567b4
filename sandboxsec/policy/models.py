"""Tables of the policy domain: policy revisions, approval requests, grants, seen login domains."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = [
    "ApprovalRequest",
    "GrantRecord",
    "GrantSigningKey",
    "LoginDomain",
    "PolicyRevision",
]


class PolicyRevision(SQLModel, table=True):
    """Every version of a tenant's action policy; the highest version is in force.

    Rows are only ever added, so the history of who changed what stays readable.  Version 0
    (no row) is the default policy shipped with the package.
    """

    __tablename__ = "policy_revisions"
    __table_args__ = (UniqueConstraint("tenant_id", "version", name="uq_policy_tenant_version"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    version: int
    text: str = Field(sa_column=Column(Text, nullable=False))
    sha256: str = Field(max_length=64)
    rule_count: int
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=40)


class ApprovalRequest(SQLModel, table=True):
    """An action waiting for (or decided by) a person, with the exact params they see."""

    __tablename__ = "approval_requests"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    session_id: str = Field(index=True, max_length=40)
    action: str = Field(max_length=64)
    resource: str = Field(max_length=600)
    #: the canonical JSON of the params: exactly what params_hash is computed over
    params_json: str = Field(sa_column=Column(Text, nullable=False))
    params_hash: str = Field(max_length=64)
    short_code: str = Field(max_length=9)
    state: str = Field(max_length=16, index=True)
    requested_by: str = Field(max_length=40)
    decision_id: str = Field(max_length=40)
    rule_id: str = Field(max_length=64)
    reason: str = Field(max_length=1000)
    image_name: str = Field(default="", max_length=500)
    image_digest: str = Field(default="", max_length=80)
    attested: bool = Field(default=False)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    decided_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    decided_by: str | None = Field(default=None, max_length=40)
    grant_id: str | None = Field(default=None, max_length=40)


class GrantRecord(SQLModel, table=True):
    """A grant issued for an allowed or approved action; ``used_at`` makes it single use.

    The token itself is not stored: it is re-signed from these columns on demand (Ed25519
    signatures are deterministic), so a database reader cannot lift tokens from here.
    """

    __tablename__ = "grants"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    session_id: str = Field(max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    decision_id: str = Field(max_length=40)
    action: str = Field(max_length=64)
    resource: str = Field(max_length=600)
    params_hash: str = Field(max_length=64)
    key_id: str = Field(max_length=16)
    issued_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    used_by: str | None = Field(default=None, max_length=40)


class GrantSigningKey(SQLModel, table=True):
    """The service's Ed25519 grant signing keys, shared by every worker through the database.

    ``private_key`` is wrapped by the root key provider (the ``KeyProvider``: a local root key
    or an HSM), bound to the key id; the database alone cannot sign grants.
    """

    __tablename__ = "grant_signing_keys"

    id: str = Field(primary_key=True, max_length=16)
    private_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    provider_id: str = Field(default="", max_length=80)
    public_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime)
    retired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class LoginDomain(SQLModel, table=True):
    """A domain this tenant's agents have logged in to with permission (no longer "new")."""

    __tablename__ = "login_domains"
    __table_args__ = (UniqueConstraint("tenant_id", "domain", name="uq_login_domain"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    domain: str = Field(max_length=255)
    first_session_id: str = Field(max_length=40)
    first_seen_at: datetime = Field(sa_type=UTCDateTime)
