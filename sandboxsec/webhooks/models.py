"""Tables of per-tenant webhooks and their delivery outbox."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, Text
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["Webhook", "WebhookDelivery"]


class Webhook(SQLModel, table=True):
    """A tenant's webhook endpoint; the signing secret is stored wrapped by the root key."""

    __tablename__ = "webhooks"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    url: str = Field(max_length=2048)
    secret_wrapped: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=40)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class WebhookDelivery(SQLModel, table=True):
    """One message to one webhook: the outbox row every worker may claim and (re)try."""

    __tablename__ = "webhook_deliveries"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    webhook_id: str = Field(index=True, max_length=40)
    event_type: str = Field(max_length=64)
    #: the exact JSON body sent (and signed) on every attempt
    payload: str = Field(sa_column=Column(Text, nullable=False))
    #: pending, delivered or failed
    state: str = Field(max_length=16, index=True)
    attempts: int = Field(default=0)
    next_attempt_at: datetime = Field(sa_type=UTCDateTime, index=True)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_status: int | None = Field(default=None)
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = Field(sa_type=UTCDateTime)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
