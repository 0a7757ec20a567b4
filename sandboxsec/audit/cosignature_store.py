"""Witness cosignatures beside the checkpoints they cosign (table ``audit_cosignatures``).

Lines are stored only after they verified under the configured witness key, and are never
trusted when read back: auditors verify them with the keys they hold.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from sandboxsec.audit.cosignature import Cosignature
from sandboxsec.audit.models import AuditCosignatureRow
from sandboxsec.audit.store import ReadConn
from sandboxsec.clock import Clock
from sandboxsec.storage.db import Database

__all__ = ["insert_cosignatures", "store_cosignatures", "stored_cosignatures"]

_COSIGS = AuditCosignatureRow.__table__  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=4)
def _upsert(dialect_name: str) -> Any:
    # Built once per dialect (a multi-row VALUES was compiled anew for every checkpoint).
    stmt = (sqlite_insert if dialect_name == "sqlite" else pg_insert)(_COSIGS)
    # A resubmission brings a fresher cosignature of the same tree: keep the newest.
    return stmt.on_conflict_do_update(
        index_elements=["tenant_id", "size", "witness"],
        set_={"line": stmt.excluded.line, "created_at": stmt.excluded.created_at},
    )


def insert_cosignatures(
    conn: Connection, now: datetime, log_id: str, size: int, cos: Sequence[Cosignature]
) -> None:
    """Write verified cosignature lines of checkpoint ``size`` in ``conn``'s transaction (the
    newest per witness); they are visible to readers, and so published, once it commits."""
    if not cos:
        return
    rows = [
        {"tenant_id": log_id, "size": size, "witness": c.witness, "line": c.line,
         "created_at": now}
        for c in cos
    ]
    conn.execute(_upsert(conn.dialect.name), rows)


def store_cosignatures(
    db: Database, clock: Clock, log_id: str, size: int, cos: Sequence[Cosignature]
) -> None:
    """Keep verified cosignature lines beside their checkpoint, in a transaction of their own."""
    if not cos:
        return
    with db.engine.begin() as conn:
        insert_cosignatures(conn, clock.now(), log_id, size, cos)


def stored_cosignatures(db: Database, log_id: str, size: int | None) -> dict[int, list[str]]:
    """Cosignature lines of ``log_id`` by checkpoint size (one size when given); unverified."""
    q = select(_COSIGS.c.size, _COSIGS.c.line).where(_COSIGS.c.tenant_id == log_id)
    if size is not None:
        q = q.where(_COSIGS.c.size == size)
    out: dict[int, list[str]] = {}
    with ReadConn(db) as conn:
        for r in conn.execute(q.order_by(_COSIGS.c.size, _COSIGS.c.witness)):
            out.setdefault(int(r[0]), []).append(str(r[1]))
    return out

