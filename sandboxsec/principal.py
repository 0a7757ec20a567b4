"""Who is calling: one API key belongs to one tenant and one role."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Principal", "Role"]


class Role(StrEnum):
    """The four roles of a tenant's API keys."""

    ADMIN = "admin"
    AGENT = "agent"
    APPROVER = "approver"
    AUDITOR = "auditor"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the tenant, the key id (never the key) and its role."""

    tenant_id: str
    key_id: str
    role: Role
