"""Serialising one check-then-write on a row, the same way on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlmodel import Session

__all__ = ["lock_row"]


def lock_row(session: Session, model: type[Any], tenant_id: str, object_id: str) -> bool:
    """Hold ``model`` row ``object_id`` of ``tenant_id`` until the transaction ends.

    A no-op UPDATE (``SET id = id``): on PostgreSQL it takes the row lock, so a concurrent
    transaction doing the same waits for this one to commit and then, under READ COMMITTED,
    reads what it committed.  On SQLite it is the transaction's first write, which takes the
    single writer lock (see :class:`~sandboxsec.storage.db.Database`); the driver runs reads
    before a transaction's first write in autocommit, so every read after this call sees the
    latest committed state and nothing can commit in between.  A count read after this and
    the insert it allows are therefore one atomic step.  Returns False when no row matched.
    """
    table = model.__table__
    result: Any = session.execute(
        update(table)
        .where(table.c.id == object_id, table.c.tenant_id == tenant_id)
        .values(id=table.c.id)
    )
    return bool(result.rowcount == 1)
