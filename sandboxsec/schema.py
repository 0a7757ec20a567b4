"""Imports every module that defines tables, so ``SQLModel.metadata`` knows the whole schema."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlmodel import SQLModel

__all__ = ["metadata"]


def metadata() -> MetaData:
    """The complete schema metadata (all domains' tables)."""
    import sandboxsec.attestation.models
    import sandboxsec.audit.models
    import sandboxsec.crypto.models
    import sandboxsec.people.models
    import sandboxsec.policy.models
    import sandboxsec.sessions.models
    import sandboxsec.tenants.models
    import sandboxsec.trajectory.models
    import sandboxsec.webhooks.models  # noqa: F401

    return SQLModel.metadata
