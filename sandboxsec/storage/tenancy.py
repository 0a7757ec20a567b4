"""Tenant scoping, in one place: a row of another tenant is indistinguishable from no row."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlmodel import Session, select

from sandboxsec.errors import NotFoundError

__all__ = ["get_scoped", "select_scoped"]

T = TypeVar("T")


def get_scoped(session: Session, model: type[T], tenant_id: str, object_id: Any, *,
               for_update: bool = False, what: str | None = None) -> T:
    """Load ``model`` row ``object_id`` owned by ``tenant_id`` or raise :class:`NotFoundError`.

    The error is the same whether the row is missing or belongs to another tenant, so ids of
    other tenants cannot be probed.
    """
    stmt = select(model).where(
        model.id == object_id,  # type: ignore[attr-defined]
        model.tenant_id == tenant_id,  # type: ignore[attr-defined]
    )
    if for_update:
        stmt = stmt.with_for_update()
    row = session.exec(stmt).first()
    if row is None:
        raise NotFoundError(f"no such {what or model.__name__.lower()}")
    return row


def select_scoped(model: type[T], tenant_id: str) -> Any:
    """A ``select`` of ``model`` already restricted to ``tenant_id``."""
    return select(model).where(model.tenant_id == tenant_id)  # type: ignore[attr-defined]
