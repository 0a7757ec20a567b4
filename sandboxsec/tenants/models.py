"""Tables: tenants and their API keys (stored only as hashes)."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["ApiKey", "Tenant"]


class Tenant(SQLModel, table=True):
    """A customer: every object and every key belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: str = Field(primary_key=True, max_length=40)
    name: str = Field(index=True, unique=True, max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ApiKey(SQLModel, table=True):
    """One API key: a tenant, a role, and the SHA-256 of its secret part (never the key)."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, foreign_key="tenants.id", max_length=40)
    role: str = Field(max_length=16)
    secret_sha256: str = Field(max_length=64)
    label: str = Field(default="", max_length=200)
    created_at: datetime = Field(sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
