"""The audit log's tables, in one place: the head lock, checkpoint queries, read connections.

Both sides of the log use this module: the writer (:mod:`.writer`) locks a log's head row
and inserts entries, nodes and checkpoints; the reader (:mod:`.reader`) reads them back.
Store failures surface as :class:`AuditUnavailableError` (fail closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.models import (
    AuditCheckpointRow,
    AuditEntryRow,
    AuditHeadRow,
    AuditNodeRow,
)
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord
from sandboxsec.storage.db import Database, DatabaseUnavailableError

__all__ = [
    "CHECKPOINTS",
    "ENTRIES",
    "HEADS",
    "NODES",
    "NODE_MIN_HEIGHT",
    "Head",
    "ReadConn",
    "StoredCheckpoint",
    "aware",
    "has_checkpoint",
    "load_checkpoints",
    "lock_head",
    "log_id_of",
]

ENTRIES = AuditEntryRow.__table__  # type: ignore[attr-defined]
HEADS = AuditHeadRow.__table__  # type: ignore[attr-defined]
CHECKPOINTS = AuditCheckpointRow.__table__  # type: ignore[attr-defined]
NODES = AuditNodeRow.__table__  # type: ignore[attr-defined]

#: Completed subtrees of at least this height (256 leaves) are stored as nodes.
NODE_MIN_HEIGHT = 8

# Statements built once: constructing them per append costs more than running them.
_HEAD_COLS = (
    HEADS.c.size,
    HEADS.c.frontier,
    HEADS.c.last_leaf,
    HEADS.c.checkpoint_size,
    HEADS.c.checkpoint_at,
)
_SELECT_HEAD = select(*_HEAD_COLS).where(HEADS.c.id == bindparam("log_id"))
_SELECT_HEAD_FOR_UPDATE = _SELECT_HEAD.with_for_update()
_TOUCH_HEAD = update(HEADS).where(HEADS.c.id == bindparam("log_id")).values(size=HEADS.c.size)
INSERT_ENTRIES = insert(ENTRIES)
INSERT_CHECKPOINT = insert(CHECKPOINTS)
INSERT_NODES = insert(NODES)
ADVANCE_HEAD = (
    update(HEADS)
    .where(HEADS.c.id == bindparam("log_id"))
    .values(
        size=bindparam("new_size"),
        frontier=bindparam("new_frontier"),
        last_leaf=bindparam("new_last_leaf"),
    )
)
ADVANCE_HEAD_SIGNED = ADVANCE_HEAD.values(
    checkpoint_size=bindparam("new_size"), checkpoint_at=bindparam("signed_at")
)


def log_id_of(record: AuditRecord) -> str:
    """The log a record goes to: its tenant's, or the service's own."""
    return record.tenant_id if record.tenant_id else SERVICE_LOG


def aware(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (SQLite hands back naive ones)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A signed checkpoint as stored."""

    log_id: str
    size: int
    root_hash: bytes
    note: str
    created_at: datetime


@dataclass(slots=True)
class Head:
    """A log's head row: size, frontier, last leaf and the last checkpoint."""

    size: int
    frontier: bytes
    last_leaf: bytes | None
    checkpoint_size: int
    checkpoint_at: datetime


def lock_head(conn: Connection, log_id: str, now: datetime) -> Head:
    """Lock (creating it if needed) and read the head row of ``log_id`` on ``conn``.

    Order is total per log across processes because every writer goes through here.
    """
    fresh = {
        "id": log_id,
        "tenant_id": log_id,
        "size": 0,
        "frontier": b"",
        "last_leaf": None,
        "checkpoint_size": 0,
        "checkpoint_at": now,
    }
    key = {"log_id": log_id}
    if conn.dialect.name == "sqlite":
        # A write first: it takes SQLite's writer lock (waiting up to the busy timeout), so
        # the head read below cannot be stale.
        if conn.execute(_TOUCH_HEAD, key).rowcount == 0:
            conn.execute(sqlite_insert(HEADS).values(**fresh).on_conflict_do_nothing())
        row = conn.execute(_SELECT_HEAD, key).one()
    else:
        found = conn.execute(_SELECT_HEAD_FOR_UPDATE, key).first()
        if found is None:
            conn.execute(pg_insert(HEADS).values(**fresh).on_conflict_do_nothing())
            found = conn.execute(_SELECT_HEAD_FOR_UPDATE, key).one()
        row = found
    return Head(
        size=row[0],
        frontier=bytes(row[1]),
        last_leaf=bytes(row[2]) if row[2] is not None else None,
        checkpoint_size=row[3],
        checkpoint_at=aware(row[4]),
    )


def has_checkpoint(conn: Connection, log_id: str) -> bool:
    """Whether any checkpoint of ``log_id`` is stored."""
    q = select(CHECKPOINTS.c.id).where(CHECKPOINTS.c.tenant_id == log_id).limit(1)
    return conn.execute(q).first() is not None


def load_checkpoints(
    db: Database, log_id: str, *, newest_only: bool = False, up_to: int | None = None
) -> list[StoredCheckpoint]:
    """Stored checkpoints of a log by size (only the newest when ``newest_only``)."""
    q = select(
        CHECKPOINTS.c.size,
        CHECKPOINTS.c.root_hash,
        CHECKPOINTS.c.note,
        CHECKPOINTS.c.created_at,
    ).where(CHECKPOINTS.c.tenant_id == log_id)
    if up_to is not None:
        q = q.where(CHECKPOINTS.c.size <= up_to)
    q = q.order_by(CHECKPOINTS.c.size.desc() if newest_only else CHECKPOINTS.c.size)
    if newest_only:
        q = q.limit(1)
    with ReadConn(db) as conn:
        rows = conn.execute(q).all()
    return [StoredCheckpoint(log_id, r[0], bytes(r[1]), r[2], aware(r[3])) for r in rows]


class ReadConn:
    """A read-only connection whose failures surface as :class:`AuditUnavailableError`."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._cm: Any = None

    def __enter__(self) -> Connection:
        try:
            self._cm = self._db.session()
            session = self._cm.__enter__()
            conn: Connection = session.connection()
            return conn
        except (SQLAlchemyError, DatabaseUnavailableError) as exc:
            raise AuditUnavailableError("the audit log cannot be read") from exc

    def __exit__(self, *exc: object) -> None:
        try:
            self._cm.__exit__(*exc)
        except (SQLAlchemyError, DatabaseUnavailableError) as err:
            raise AuditUnavailableError("the audit log cannot be read") from err
