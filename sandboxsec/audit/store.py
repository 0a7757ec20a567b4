"""The audit log's tables, in one place: the head lock, checkpoint queries, read connections.

Both sides of the log use this module: the writer (:mod:`.writer`) locks a log's head row
and inserts entries, nodes and checkpoints; the reader (:mod:`.reader`) reads them back.
Store failures surface as :class:`AuditUnavailableError` (fail closed).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import SQLAlchemyError

from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.models import (
    AuditCheckpointRow,
    AuditEntryRow,
    AuditHeadRow,
    AuditNodeRow,
    AuditPendingRow,
)
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord
from sandboxsec.storage.db import Database, DatabaseUnavailableError, DriverForm

__all__ = [
    "CHECKPOINTS",
    "ENTRIES",
    "HEADS",
    "INSERT_PENDING",
    "NODES",
    "NODE_MIN_HEIGHT",
    "PENDING",
    "Head",
    "ReadConn",
    "StoredCheckpoint",
    "aware",
    "has_checkpoint",
    "insert_entries",
    "load_checkpoints",
    "lock_free_heads",
    "lock_head",
    "log_id_of",
    "logs_with_pending",
    "pending_logs",
    "take_pending",
    "try_lock_head",
]

ENTRIES = AuditEntryRow.__table__  # type: ignore[attr-defined]
HEADS = AuditHeadRow.__table__  # type: ignore[attr-defined]
CHECKPOINTS = AuditCheckpointRow.__table__  # type: ignore[attr-defined]
NODES = AuditNodeRow.__table__  # type: ignore[attr-defined]
PENDING = AuditPendingRow.__table__  # type: ignore[attr-defined]

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
# SQLite: the write that takes the writer lock also reads the head (one statement, not two;
# RETURNING needs SQLite 3.35, which the proof replay store's insert already does).
_TOUCH_HEAD_RETURNING = _TOUCH_HEAD.returning(*_HEAD_COLS)
INSERT_ENTRIES = insert(ENTRIES)
INSERT_CHECKPOINT = insert(CHECKPOINTS)
INSERT_NODES = insert(NODES)
INSERT_PENDING = insert(PENDING)
_ENTRY_COLUMNS = ("tenant_id", "seq", "event", "time", "entry", "leaf_hash")
#: Intents moved per statement while sequencing (a transaction drains all it sees).
_TAKE_CHUNK = 4096
_TAKE_PENDING = (
    delete(PENDING)
    .where(
        PENDING.c.id.in_(
            select(PENDING.c.id)
            .where(PENDING.c.tenant_id == bindparam("log_id"))
            .order_by(PENDING.c.id)
            .limit(_TAKE_CHUNK)
            .scalar_subquery()
        )
    )
    .returning(PENDING.c.id, PENDING.c.event, PENDING.c.tail)
)
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


def _identity(value: Any) -> Any:
    return value


@functools.lru_cache(maxsize=8)
def _driver_insert(dialect: Dialect) -> DriverForm:
    # Compiled by SQLAlchemy for this dialect, values converted by the columns' own bind
    # processors: the rows stored are those ``conn.execute(INSERT_ENTRIES, rows)`` stores.
    form = DriverForm.of(
        insert(ENTRIES).values({c: bindparam(c) for c in _ENTRY_COLUMNS}), dialect
    )
    if form.positions is not None and form.positions != _ENTRY_COLUMNS:
        raise RuntimeError("unexpected parameter order for the audit entry insert")
    return form


def insert_entries(
    conn: Connection,
    log_id: str,
    time: datetime,
    rows: Sequence[tuple[int, str, str, bytes]],
) -> None:
    """Insert entries ``(seq, event, line, leaf_hash)`` of ``log_id``, all written at ``time``.

    One driver-level executemany of a statement compiled once per dialect: the values every
    row shares are converted once, where the Core path converts each row's through the column
    types (for the 1,000-row batches of a busy log that was about half the insert's cost).
    """
    form = _driver_insert(conn.dialect)
    at = form.processors.get("time", _identity)(time)
    blob = form.processors.get("leaf_hash", _identity)
    if form.positions is not None:
        params: list[Any] = [
            (log_id, seq, event, at, line, blob(h)) for seq, event, line, h in rows
        ]
    else:
        params = [
            {"tenant_id": log_id, "seq": seq, "event": event, "time": at, "entry": line,
             "leaf_hash": blob(h)}
            for seq, event, line, h in rows
        ]
    conn.exec_driver_sql(form.sql, params)


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
        touched = conn.execute(_TOUCH_HEAD_RETURNING, key).first()
        if touched is None:
            conn.execute(sqlite_insert(HEADS).values(**fresh).on_conflict_do_nothing())
            touched = conn.execute(_SELECT_HEAD, key).one()
        row = touched
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


def try_lock_head(conn: Connection, log_id: str, now: datetime) -> Head | None:
    """Like :func:`lock_head`, but None at once when another transaction holds the head
    (PostgreSQL ``SKIP LOCKED``; SQLite has one writer, so there it waits as usual)."""
    if conn.dialect.name != "postgresql":
        return lock_head(conn, log_id, now)
    if lock_free_heads(conn, {log_id}, now):
        return None
    return lock_head(conn, log_id, now)  # already ours: returns without waiting


def take_pending(conn: Connection, log_id: str) -> list[tuple[str, str]]:
    """Remove and return every committed append intent of ``log_id`` visible to ``conn``, as
    ``(event, tail)`` in intent order.  Call only with the log's head locked."""
    out: list[tuple[str, str]] = []
    while True:
        rows = sorted(conn.execute(_TAKE_PENDING, {"log_id": log_id}).all(),
                      key=lambda r: int(r[0]))
        out.extend((r[1], r[2]) for r in rows)
        if len(rows) < _TAKE_CHUNK:
            return out


def logs_with_pending(conn: Connection, log_ids: set[str]) -> set[str]:
    """Those of ``log_ids`` that have committed append intents waiting."""
    q = select(PENDING.c.tenant_id).where(PENDING.c.tenant_id.in_(sorted(log_ids))).distinct()
    return {r[0] for r in conn.execute(q)}


def pending_logs(conn: Connection) -> list[str]:
    """Logs that have append intents waiting to be sequenced."""
    return sorted(r[0] for r in conn.execute(select(PENDING.c.tenant_id).distinct()))


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


def lock_free_heads(conn: Connection, log_ids: set[str], now: datetime) -> set[str]:
    """On PostgreSQL, lock now the heads of ``log_ids`` that no other transaction holds
    (``FOR UPDATE SKIP LOCKED``, creating missing ones) and return the ids another transaction
    holds.  On SQLite the database has one writer, so nothing is ever busy here.

    This is what keeps one tenant's stuck head (a long transaction, a held row lock) from
    delaying other tenants' appends, exports and checkpoints.
    """
    if conn.dialect.name != "postgresql" or not log_ids:
        return set()
    ids = sorted(log_ids)
    stmt = select(HEADS.c.id).where(HEADS.c.id.in_(ids)).order_by(HEADS.c.id)
    got = {r[0] for r in conn.execute(stmt.with_for_update(skip_locked=True))}
    missing = [i for i in ids if i not in got]
    if missing:
        conn.execute(pg_insert(HEADS).values([
            {"id": i, "tenant_id": i, "size": 0, "frontier": b"", "last_leaf": None,
             "checkpoint_size": 0, "checkpoint_at": now} for i in missing
        ]).on_conflict_do_nothing())
        again = select(HEADS.c.id).where(HEADS.c.id.in_(missing)).order_by(HEADS.c.id)
        got |= {r[0] for r in conn.execute(again.with_for_update(skip_locked=True))}
    return log_ids - got
