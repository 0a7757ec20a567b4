"""The audit log service: durable, totally ordered appends; checkpoints; exports and proofs.

This is the adapter around the pure core (:mod:`~sandboxsec.audit.entry`,
:mod:`~sandboxsec.audit.merkle`, :mod:`~sandboxsec.audit.checkpoint`).  Contract:

* ``append(record, session=s)`` writes the entry in the caller's transaction, so the change
  and its entry commit (or roll back) together.  Use it whenever the caller has a transaction.
* ``append(record)`` hands the entry to a group-commit writer that batches concurrent callers
  into one transaction and returns only after that transaction committed.  A caller waits at
  most ``audit_write_timeout_seconds``; past it, or on any store failure, it gets
  :class:`AuditUnavailableError` (503) and must not carry out the action.
* Order is total per log across processes: every append locks the log's head row (``SELECT ...
  FOR UPDATE`` on PostgreSQL; on SQLite the first statement is a write, which takes the
  database's single writer lock before the head is read).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint
from sandboxsec.audit.entry import encode_entry, hmac_value
from sandboxsec.audit.errors import AuditRangeError, AuditUnavailableError
from sandboxsec.audit.export import ConsistencyRecord, ExportHeader, render_export
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.merkle import Frontier, ProofError, ProofSource, perfect_root
from sandboxsec.audit.models import (
    AuditCheckpointRow,
    AuditEntryRow,
    AuditHeadRow,
    AuditNodeRow,
)
from sandboxsec.audit.record import SERVICE_LOG, AuditReceipt, AuditRecord
from sandboxsec.crypto.signing import hsm_signer
from sandboxsec.errors import SandboxSecError
from sandboxsec.storage.db import DatabaseUnavailableError

if TYPE_CHECKING:
    from sandboxsec.services import Services

__all__ = ["AuditLog", "StoredCheckpoint", "log_id_of"]

_log = structlog.get_logger("sandboxsec.audit")

_ENTRIES = AuditEntryRow.__table__  # type: ignore[attr-defined]
_HEADS = AuditHeadRow.__table__  # type: ignore[attr-defined]
_CHECKPOINTS = AuditCheckpointRow.__table__  # type: ignore[attr-defined]
_NODES = AuditNodeRow.__table__  # type: ignore[attr-defined]

#: Completed subtrees of at least this height (256 leaves) are stored as nodes.
NODE_MIN_HEIGHT = 8

# Statements built once: constructing them per append costs more than running them.
_HEAD_COLS = (
    _HEADS.c.size,
    _HEADS.c.frontier,
    _HEADS.c.last_leaf,
    _HEADS.c.checkpoint_size,
    _HEADS.c.checkpoint_at,
)
_SELECT_HEAD = select(*_HEAD_COLS).where(_HEADS.c.id == bindparam("log_id"))
_SELECT_HEAD_FOR_UPDATE = _SELECT_HEAD.with_for_update()
_TOUCH_HEAD = (
    update(_HEADS).where(_HEADS.c.id == bindparam("log_id")).values(size=_HEADS.c.size)
)
_INSERT_ENTRIES = insert(_ENTRIES)
_INSERT_CHECKPOINT = insert(_CHECKPOINTS)
_INSERT_NODES = insert(_NODES)
_ADVANCE_HEAD = (
    update(_HEADS)
    .where(_HEADS.c.id == bindparam("log_id"))
    .values(
        size=bindparam("new_size"),
        frontier=bindparam("new_frontier"),
        last_leaf=bindparam("new_last_leaf"),
    )
)
_ADVANCE_HEAD_SIGNED = _ADVANCE_HEAD.values(
    checkpoint_size=bindparam("new_size"), checkpoint_at=bindparam("signed_at")
)

#: Most records one group-commit transaction carries.
_MAX_BATCH = 4096
#: Group commit: below this many queued callers, linger briefly for more to arrive.
_LINGER_BELOW = 32
_LINGER_SECONDS = 0.0005
#: Entries read per query while streaming an export.
_EXPORT_CHUNK = 5000


def log_id_of(record: AuditRecord) -> str:
    """The log a record goes to: its tenant's, or the service's own."""
    return record.tenant_id if record.tenant_id else SERVICE_LOG


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A signed checkpoint as stored."""

    log_id: str
    size: int
    root_hash: bytes
    note: str
    created_at: datetime


@dataclass(slots=True)
class _Head:
    size: int
    frontier: bytes
    last_leaf: bytes | None
    checkpoint_size: int
    checkpoint_at: datetime


class AuditLog:
    """The tamper-evident audit log of one service (all tenants' logs and the service log)."""

    def __init__(self, services: Services) -> None:
        self._s = services
        settings = services.settings
        self._every = settings.audit_checkpoint_every
        self._period = timedelta(seconds=settings.audit_checkpoint_seconds)
        self._timeout = settings.audit_write_timeout_seconds
        self.keys = AuditKeys(settings.home, settings.audit_origin,
                              hsm=lambda: hsm_signer(services.keys, "audit-checkpoint"))
        self._writer = _GroupCommit(self)

    # ----------------------------------------------------------------------------- writing

    def origin(self, log_id: str) -> str:
        """The checkpoint origin line of a log: ``<audit_origin>/<log id>``."""
        return f"{self._s.settings.audit_origin}/{log_id}"

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        """Durably append one record; raises :class:`AuditUnavailableError` when it cannot."""
        return self.append_many([record], session=session)[0]

    def append_many(
        self, records: Sequence[AuditRecord], *, session: Any | None = None
    ) -> list[AuditReceipt]:
        """Append records in order, in one transaction (the caller's when ``session`` given)."""
        if not records:
            return []
        if session is None:
            return self._writer.submit(list(records), self._timeout)
        # The writer thread also signs time-based checkpoints, so start it on any append.
        self._writer.ensure_started()
        try:
            return self.write(session.connection(), records)
        except SandboxSecError:
            raise
        except SQLAlchemyError as exc:
            raise AuditUnavailableError(
                "the audit log could not record this; the action was not carried out"
            ) from exc

    def write(self, conn: Connection, records: Sequence[AuditRecord]) -> list[AuditReceipt]:
        """Sequence and insert ``records`` on ``conn`` (inside its open transaction)."""
        now = self._s.clock.now()
        by_log: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_log.setdefault(log_id_of(r), []).append(i)
        receipts: list[AuditReceipt | None] = [None] * len(records)
        # Logs are locked in sorted order so two multi-log batches cannot deadlock.
        for log_id in sorted(by_log):
            head = self._lock_head(conn, log_id, now)
            frontier = Frontier.from_bytes(head.size, head.frontier)
            prev = head.last_leaf
            key = self.keys.hmac_key(log_id)
            rows = []
            nodes: list[tuple[int, int, bytes]] = []
            for i in by_log[log_id]:
                e = encode_entry(
                    records[i], log_id=log_id, seq=frontier.size, prev=prev, now=now, hmac_key=key
                )
                rows.append(
                    {
                        "tenant_id": log_id,
                        "seq": e.seq,
                        "event": str(records[i].event)[:64],
                        "time": now,
                        "entry": e.line.decode("ascii"),
                        "leaf_hash": e.leaf_hash,
                    }
                )
                frontier.append_recording(e.leaf_hash, nodes, NODE_MIN_HEIGHT)
                prev = e.leaf_hash
                receipts[i] = AuditReceipt(log_id=log_id, seq=e.seq)
            conn.execute(_INSERT_ENTRIES, rows)
            if nodes:
                node_rows = [
                    {"tenant_id": log_id, "level": lv, "idx": ix, "hash": h}
                    for lv, ix, h in nodes
                ]
                conn.execute(_INSERT_NODES, node_rows)
            values: dict[str, Any] = {
                "log_id": log_id,
                "new_size": frontier.size,
                "new_frontier": frontier.to_bytes(),
                "new_last_leaf": prev,
            }
            if frontier.size - head.checkpoint_size >= self._every or (
                now - head.checkpoint_at >= self._period
            ):
                self._sign(conn, log_id, frontier, now)
                conn.execute(_ADVANCE_HEAD_SIGNED, {**values, "signed_at": now})
            else:
                conn.execute(_ADVANCE_HEAD, values)
        return [r for r in receipts if r is not None]

    def _lock_head(self, conn: Connection, log_id: str, now: datetime) -> _Head:
        fresh = {
            "id": log_id,
            "tenant_id": log_id,
            "size": 0,
            "frontier": b"",
            "last_leaf": None,
            "checkpoint_size": 0,
            "checkpoint_at": now,
        }
        if conn.dialect.name == "sqlite":
            # A write first: it takes SQLite's writer lock (waiting up to the busy timeout), so
            # the head read below cannot be stale.
            key = {"log_id": log_id}
            if conn.execute(_TOUCH_HEAD, key).rowcount == 0:
                conn.execute(sqlite_insert(_HEADS).values(**fresh).on_conflict_do_nothing())
            row = conn.execute(_SELECT_HEAD, key).one()
        else:
            key = {"log_id": log_id}
            found = conn.execute(_SELECT_HEAD_FOR_UPDATE, key).first()
            if found is None:
                conn.execute(pg_insert(_HEADS).values(**fresh).on_conflict_do_nothing())
                found = conn.execute(_SELECT_HEAD_FOR_UPDATE, key).one()
            row = found
        return _Head(
            size=row[0],
            frontier=bytes(row[1]),
            last_leaf=bytes(row[2]) if row[2] is not None else None,
            checkpoint_size=row[3],
            checkpoint_at=_aware(row[4]),
        )

    def lock_free_heads(self, conn: Connection, log_ids: set[str], now: datetime) -> set[str]:
        """On PostgreSQL, lock now the heads of ``log_ids`` that no other transaction holds
        (``FOR UPDATE SKIP LOCKED``) and return the ids of those another transaction holds.

        This is what keeps one tenant's stuck head (a long transaction, a held row lock) from
        delaying every other tenant's appends in a shared group commit: the writer commits the
        logs it could lock and hands the others to a separate, per-log path.  On SQLite the
        database has one writer, so nothing is ever busy here.
        """
        if conn.dialect.name != "postgresql" or not log_ids:
            return set()
        ids = sorted(log_ids)
        locked = _HEADS.c.id.in_(ids)
        stmt = select(_HEADS.c.id).where(locked).order_by(_HEADS.c.id)
        got = {r[0] for r in conn.execute(stmt.with_for_update(skip_locked=True))}
        missing = [i for i in ids if i not in got]
        if missing:
            conn.execute(pg_insert(_HEADS).values([
                {"id": i, "tenant_id": i, "size": 0, "frontier": b"", "last_leaf": None,
                 "checkpoint_size": 0, "checkpoint_at": now} for i in missing
            ]).on_conflict_do_nothing())
            again = select(_HEADS.c.id).where(_HEADS.c.id.in_(missing)).order_by(_HEADS.c.id)
            got |= {r[0] for r in conn.execute(again.with_for_update(skip_locked=True))}
        return log_ids - got

    def _sign(self, conn: Connection, log_id: str, frontier: Frontier, now: datetime) -> None:
        cp = Checkpoint(self.origin(log_id), frontier.size, frontier.root())
        signed = sign_checkpoint(cp, name=self.keys.key_name, private_key=self.keys.signing_key)
        conn.execute(
            _INSERT_CHECKPOINT,
            {
                "tenant_id": log_id,
                "size": cp.size,
                "root_hash": cp.root_hash,
                "note": signed.note,
                "created_at": now,
            },
        )

    # ------------------------------------------------------------------------- checkpoints

    def checkpoint_now(self, log_id: str) -> StoredCheckpoint:
        """The latest checkpoint, signing one first if entries were added since the last."""
        latest = self._checkpoint_now(log_id, wait=True)
        assert latest is not None  # waited for the head: always signed or found
        return latest

    def _checkpoint_now(self, log_id: str, *, wait: bool) -> StoredCheckpoint | None:
        """:meth:`checkpoint_now`; with ``wait=False`` a head that another transaction holds
        is skipped (None) instead of waited for: the background sweep must not stall on one
        tenant's stuck head."""
        now = self._s.clock.now()
        try:
            with self._s.db.session() as s:
                conn = s.connection()
                if not wait and self.lock_free_heads(conn, {log_id}, now):
                    return None
                head = self._lock_head(conn, log_id, now)
                if head.size > head.checkpoint_size or not self._has_checkpoint(conn, log_id):
                    self._sign(conn, log_id, Frontier.from_bytes(head.size, head.frontier), now)
                    conn.execute(
                        update(_HEADS)
                        .where(_HEADS.c.id == log_id)
                        .values(checkpoint_size=head.size, checkpoint_at=now)
                    )
        except (SQLAlchemyError, DatabaseUnavailableError) as exc:
            raise AuditUnavailableError("the audit log cannot be read") from exc
        latest = self.latest_checkpoint(log_id)
        assert latest is not None
        return latest

    def sign_due_checkpoints(self) -> int:
        """Sign a checkpoint for every log with entries older than the checkpoint period."""
        now = self._s.clock.now()
        with self._s.db.session() as s:
            due = s.connection().execute(
                select(_HEADS.c.id).where(
                    _HEADS.c.size > _HEADS.c.checkpoint_size,
                    _HEADS.c.checkpoint_at <= now - self._period,
                )
            )
            ids = [r[0] for r in due]
        signed = 0
        for log_id in ids:
            if self._checkpoint_now(log_id, wait=False) is not None:
                signed += 1
        return signed

    @staticmethod
    def _has_checkpoint(conn: Connection, log_id: str) -> bool:
        q = select(_CHECKPOINTS.c.id).where(_CHECKPOINTS.c.tenant_id == log_id).limit(1)
        return conn.execute(q).first() is not None

    def latest_checkpoint(self, log_id: str) -> StoredCheckpoint | None:
        """The newest stored checkpoint of a log, if any."""
        rows = self._checkpoints(log_id, newest_only=True)
        return rows[0] if rows else None

    def _checkpoints(
        self, log_id: str, *, newest_only: bool = False, up_to: int | None = None
    ) -> list[StoredCheckpoint]:
        q = select(
            _CHECKPOINTS.c.size,
            _CHECKPOINTS.c.root_hash,
            _CHECKPOINTS.c.note,
            _CHECKPOINTS.c.created_at,
        ).where(_CHECKPOINTS.c.tenant_id == log_id)
        if up_to is not None:
            q = q.where(_CHECKPOINTS.c.size <= up_to)
        q = q.order_by(_CHECKPOINTS.c.size.desc() if newest_only else _CHECKPOINTS.c.size)
        if newest_only:
            q = q.limit(1)
        with self._read() as conn:
            rows = conn.execute(q).all()
        return [
            StoredCheckpoint(log_id, r[0], bytes(r[1]), r[2], _aware(r[3])) for r in rows
        ]

    # ----------------------------------------------------------------------------- reading

    def _read(self) -> _ReadConn:
        return _ReadConn(self)

    def tree(self, log_id: str, size: int) -> StoredTree:
        """Proof building over the stored nodes and leaf hashes of the first ``size`` entries."""
        return StoredTree(self, log_id, size)

    def entry_lines(self, log_id: str, start: int, end: int) -> Iterator[bytes]:
        """The stored canonical lines of entries ``start <= seq < end``, in order, in chunks."""
        lo = start
        while lo < end:
            hi = min(end, lo + _EXPORT_CHUNK)
            q = (
                select(_ENTRIES.c.seq, _ENTRIES.c.entry)
                .where(_ENTRIES.c.tenant_id == log_id, _ENTRIES.c.seq >= lo, _ENTRIES.c.seq < hi)
                .order_by(_ENTRIES.c.seq)
            )
            with self._read() as conn:
                rows = conn.execute(q).all()
            for r in rows:
                yield r[1].encode("ascii") if isinstance(r[1], str) else bytes(r[1])
            lo = hi

    def entries(
        self, log_id: str, *, event: str | None = None, start: int = 0, end: int | None = None
    ) -> list[dict[str, Any]]:
        """Parsed entries of a log (optionally one event type), oldest first."""
        q = select(_ENTRIES.c.entry).where(_ENTRIES.c.tenant_id == log_id, _ENTRIES.c.seq >= start)
        if end is not None:
            q = q.where(_ENTRIES.c.seq < end)
        if event is not None:
            q = q.where(_ENTRIES.c.event == str(event))
        with self._read() as conn:
            rows = conn.execute(q.order_by(_ENTRIES.c.seq)).all()
        return [json.loads(r[0]) for r in rows]

    def hash_value(self, log_id: str, value: Any) -> str:
        """The HMAC a sensitive ``value`` would have in ``log_id`` (for an auditor to match)."""
        return hmac_value(self.keys.hmac_key(log_id), value)

    def size(self, log_id: str) -> int:
        """The number of entries of a log."""
        with self._read() as conn:
            row = conn.execute(select(_HEADS.c.size).where(_HEADS.c.id == log_id)).first()
        return int(row[0]) if row else 0

    # ------------------------------------------------------------------- exports and proofs

    def export(
        self, log_id: str, *, start: int = 0, end: int | None = None, since: int | None = None
    ) -> Iterator[bytes]:
        """The export file of entries ``start <= seq < end`` as a stream of lines.

        A fresh checkpoint is signed first, so the newest entries are covered.  ``end`` is
        moved up to the next checkpoint size so every exported entry is under a signature.
        ``since`` is a tree size the auditor already holds a checkpoint for; the export then
        carries a consistency proof from it.  Range errors are raised before the first line.
        """
        latest = self.checkpoint_now(log_id)
        if end is None:
            end = latest.size
        if start < 0 or end < start or end > latest.size:
            raise AuditRangeError(f"the range {start}..{end} is outside 0..{latest.size}")
        if since is not None and not 0 <= since <= latest.size:
            raise AuditRangeError(f"no tree of size {since} in a log of {latest.size} entries")
        stored = self._checkpoints(log_id)
        sizes = [c.size for c in stored]
        end = min(s for s in sizes if s >= end)
        # Checkpoints covering the range, and the newest one before it (continuity).
        chosen = [c for c in stored if start <= c.size <= end]
        before = [c for c in stored if c.size < start]
        if before:
            chosen.insert(0, before[-1])
        tree = self.tree(log_id, end)
        proofs: list[ConsistencyRecord] = []
        pairs = list(zip([c.size for c in chosen], [c.size for c in chosen][1:], strict=False))
        if since is not None and chosen:
            target = next((c.size for c in chosen if c.size >= since), None)
            if target is not None and since not in [c.size for c in chosen]:
                pairs.append((since, target))
        for a, b in pairs:
            try:
                proofs.append(ConsistencyRecord(a, b, tree.consistency_proof(a, b)))
            except ProofError:
                # Stored rows are missing (tampered); the verifier names the gap.
                continue
        try:
            frontier = tree.frontier(start).hashes or []
        except ProofError:
            frontier = []
        header = ExportHeader(
            log_id=log_id,
            origin=self.origin(log_id),
            key_name=self.keys.key_name,
            start=start,
            end=end,
            frontier=frontier,
            prev_leaf=tree.leaf(start - 1) if start > 0 else None,
        )
        return render_export(
            header, [c.note for c in chosen], proofs, self.entry_lines(log_id, start, end)
        )

    def inclusion(self, log_id: str, seq: int, size: int | None = None) -> dict[str, Any]:
        """A self-contained proof that entry ``seq`` is in a signed checkpoint.

        ``size`` picks a stored checkpoint (default: the newest, signed now if needed).
        """
        cp = self.checkpoint_now(log_id) if size is None else self._checkpoint_at(log_id, size)
        if not 0 <= seq < cp.size:
            raise AuditRangeError(f"entry {seq} is not in the checkpoint of size {cp.size}")
        try:
            proof = self.tree(log_id, cp.size).inclusion_proof(seq)
        except ProofError as exc:
            raise AuditUnavailableError("the stored log is incomplete") from exc
        line = next(self.entry_lines(log_id, seq, seq + 1), b"")
        return {
            "log_id": log_id,
            "seq": seq,
            "entry": line.decode("ascii"),
            "tree_size": cp.size,
            "checkpoint": cp.note,
            "proof": [base64.b64encode(h).decode() for h in proof],
        }

    def consistency(self, log_id: str, first: int, second: int) -> dict[str, Any]:
        """A consistency proof between two stored checkpoints, with both signed notes."""
        a = self._checkpoint_at(log_id, first)
        b = self._checkpoint_at(log_id, second)
        if a.size > b.size:
            raise AuditRangeError("the first checkpoint must not be larger than the second")
        try:
            proof = self.tree(log_id, b.size).consistency_proof(a.size)
        except ProofError as exc:
            raise AuditUnavailableError("the stored log is incomplete") from exc
        return {
            "log_id": log_id,
            "first": a.size,
            "second": b.size,
            "first_checkpoint": a.note,
            "second_checkpoint": b.note,
            "proof": [base64.b64encode(h).decode() for h in proof],
        }

    def _checkpoint_at(self, log_id: str, size: int) -> StoredCheckpoint:
        for c in self._checkpoints(log_id, up_to=size):
            if c.size == size:
                return c
        raise AuditRangeError(f"no checkpoint of size {size}")

    def close(self) -> None:
        """Stop the group-commit writer (pending callers get their answer first)."""
        self._writer.stop()


class StoredTree(ProofSource):
    """RFC 9162 proofs from the database: stored nodes, and leaf hashes read in 256-blocks.

    Perfect subtrees of height >= ``NODE_MIN_HEIGHT`` come from ``audit_nodes`` (loaded once,
    about n/128 rows); smaller ones are hashed from an aligned block of leaf hashes, so any
    proof reads at most a few blocks whatever the size of the log.  Missing rows (a damaged or
    tampered store) raise :class:`ProofError`.
    """

    _BLOCK = 1 << NODE_MIN_HEIGHT

    def __init__(self, log: AuditLog, log_id: str, size: int) -> None:
        self.size = size
        self._log = log
        self._id = log_id
        self._blocks: dict[int, list[bytes]] = {}
        q = select(_NODES.c.level, _NODES.c.idx, _NODES.c.hash).where(_NODES.c.tenant_id == log_id)
        with log._read() as conn:
            rows = conn.execute(q).all()
        self._nodes = {
            (lv, ix): bytes(h) for lv, ix, h in rows if (ix + 1) << lv <= size
        }

    def perfect(self, level: int, index: int) -> bytes:
        lo = index << level
        if lo + (1 << level) > self.size:
            raise ProofError(f"subtree {index} at height {level} is beyond size {self.size}")
        if level >= NODE_MIN_HEIGHT:
            node = self._nodes.get((level, index))
            if node is None:
                raise ProofError(f"the stored node {index} at height {level} is missing")
            return node
        block = self._block(lo // self._BLOCK)
        off = lo % self._BLOCK
        part = block[off : off + (1 << level)]
        if len(part) != 1 << level:
            raise ProofError(f"stored leaves {lo}..{lo + (1 << level) - 1} are missing")
        return perfect_root(part)

    def leaf(self, seq: int) -> bytes | None:
        """The stored leaf hash of entry ``seq`` (None when missing)."""
        block = self._block(seq // self._BLOCK)
        off = seq % self._BLOCK
        return block[off] if off < len(block) else None

    def _block(self, b: int) -> list[bytes]:
        cached = self._blocks.get(b)
        if cached is not None:
            return cached
        lo, hi = b * self._BLOCK, min(self.size, (b + 1) * self._BLOCK)
        q = (
            select(_ENTRIES.c.seq, _ENTRIES.c.leaf_hash)
            .where(_ENTRIES.c.tenant_id == self._id, _ENTRIES.c.seq >= lo, _ENTRIES.c.seq < hi)
            .order_by(_ENTRIES.c.seq)
        )
        with self._log._read() as conn:
            rows = conn.execute(q).all()
        # Keep only a gap-free run from the block start: a gap means rows were removed.
        leaves: list[bytes] = []
        for seq, h in rows:
            if seq != lo + len(leaves):
                break
            leaves.append(bytes(h))
        if len(self._blocks) >= 64:
            self._blocks.clear()
        self._blocks[b] = leaves
        return leaves


class _ReadConn:
    """A read-only connection whose failures surface as :class:`AuditUnavailableError`."""

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._cm: Any = None

    def __enter__(self) -> Connection:
        try:
            self._cm = self._log._s.db.session()
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


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# ---------------------------------------------------------------------------- group commit


class _Pending:
    __slots__ = ("done", "error", "receipts", "records", "state")

    QUEUED, TAKEN, CANCELLED, DEFERRED = 0, 1, 2, 3

    def __init__(self, records: list[AuditRecord]) -> None:
        self.records = records
        self.receipts: list[AuditReceipt] = []
        self.error: SandboxSecError | None = None
        # A held lock that the writer releases: cheaper than an Event (no condition inside).
        self.done = threading.Lock()
        self.done.acquire()
        self.state = _Pending.QUEUED


class _GroupCommit:
    """One writer thread per process: batches concurrent appends into one transaction.

    Each caller waits for the commit of the transaction that holds its records.  A caller that
    times out is told the audit failed; if its records were not yet taken they are dropped,
    otherwise they may still commit (the log then over-reports an attempt, never under-reports).
    The thread also signs checkpoints for logs that have been idle past the checkpoint period.
    """

    def __init__(self, log: AuditLog) -> None:
        self._log = log
        self._cv = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: Pendings waiting for a head another transaction holds, by the set of their logs.
        self._slow: dict[frozenset[str], deque[_Pending]] = {}
        self._sweep_seconds = max(0.05, log._period.total_seconds())

    def ensure_started(self) -> None:
        with self._cv:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(
                target=self._run, name="sandboxsec-audit-writer", daemon=True
            )
            self._thread.start()

    def submit(self, records: list[AuditRecord], timeout: float) -> list[AuditReceipt]:
        p = _Pending(records)
        with self._cv:
            if self._stopping:
                raise AuditUnavailableError("the audit log is shutting down")
            self._start_locked()
            self._queue.append(p)
            self._cv.notify()
        if not p.done.acquire(timeout=timeout):
            with self._cv:
                if p.state == _Pending.QUEUED:
                    p.state = _Pending.CANCELLED
                    self._queue.remove(p)
            raise AuditUnavailableError(
                "the audit log did not confirm the write in time; the action was not carried out"
            )
        if p.error is not None:
            raise p.error
        return p.receipts

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=self._log._timeout + 1)

    def _run(self) -> None:
        concurrent = False
        while True:
            batch: list[_Pending] = []
            with self._cv:
                if not self._queue and not self._stopping:
                    self._cv.wait(timeout=self._sweep_seconds)
                if self._stopping and not self._queue:
                    return
            if concurrent and 0 < len(self._queue) < _LINGER_BELOW:
                # Under concurrent load, a short pause lets the other callers join this
                # commit; a lone caller (last batch of one) never pays it.
                time.sleep(_LINGER_SECONDS)
            with self._cv:
                n = 0
                while self._queue and n < _MAX_BATCH:
                    p = self._queue.popleft()
                    p.state = _Pending.TAKEN
                    batch.append(p)
                    n += len(p.records)
            if batch:
                concurrent = len(batch) > 1
                self._commit(batch)
            else:
                self._sweep()

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self._commit_once(batch)
        except Exception as exc:  # every failure must reach the waiting callers
            # Pendings handed to the busy-head path are answered there.
            batch = [p for p in batch if p.state != _Pending.DEFERRED]
            if not batch:
                return
            unavailable = isinstance(exc, OperationalError | DatabaseUnavailableError)
            if len(batch) > 1 and not unavailable:
                # One bad record must not deny the others: retry each on its own.
                for p in batch:
                    self._commit([p])
                return
            _log.error("audit_write_failed", error=type(exc).__name__, records=len(batch))
            err = (
                exc
                if isinstance(exc, AuditUnavailableError)
                else AuditUnavailableError(
                    "the audit log could not record this; the action was not carried out"
                )
            )
            for p in batch:
                p.error = err
                p.done.release()

    def _commit_once(self, batch: list[_Pending], *, wait: bool = False) -> None:
        # A bare Core transaction: the ORM session adds nothing here but per-commit overhead.
        with self._log._s.db.engine.begin() as conn:
            if not wait:
                logs = {log_id_of(r) for p in batch for r in p.records}
                busy = self._log.lock_free_heads(conn, logs, self._log._s.clock.now())
                if busy:
                    # Another transaction holds these heads: their callers wait on their own
                    # path; everyone else commits now (heads already locked above).
                    stuck = [p for p in batch if any(log_id_of(r) in busy for r in p.records)]
                    batch = [p for p in batch if p not in stuck]
                    self._defer(stuck)
            records = [r for p in batch for r in p.records]
            receipts = self._log.write(conn, records) if records else []
        # Acknowledge only now, after the commit returned.
        i = 0
        for p in batch:
            p.receipts = receipts[i : i + len(p.records)]
            i += len(p.records)
            p.done.release()

    def _defer(self, stuck: list[_Pending]) -> None:
        """Commit pendings whose heads are busy on one thread per set of logs, waiting for
        the lock there (bounded by the database lock timeout and each caller's timeout)."""
        for p in stuck:
            p.state = _Pending.DEFERRED
            key = frozenset(log_id_of(r) for r in p.records)
            with self._cv:
                queue = self._slow.get(key)
                if queue is not None:
                    queue.append(p)  # that set's thread is running and will take it
                    continue
                self._slow[key] = deque([p])
            threading.Thread(target=self._run_slow, args=(key,), daemon=True,
                             name="sandboxsec-audit-writer-busy").start()

    def _run_slow(self, key: frozenset[str]) -> None:
        while True:
            with self._cv:
                queue = self._slow[key]
                if not queue:
                    del self._slow[key]  # the key's presence is what says a thread runs
                    return
                batch = list(queue)
                queue.clear()
            try:
                self._commit_once(batch, wait=True)
            except Exception as exc:  # every failure must reach the waiting callers
                _log.error("audit_write_failed", error=type(exc).__name__, records=len(batch))
                err = exc if isinstance(exc, AuditUnavailableError) else AuditUnavailableError(
                    "the audit log could not record this; the action was not carried out")
                for p in batch:
                    p.error = err
                    p.done.release()

    def _sweep(self) -> None:
        try:
            self._log.sign_due_checkpoints()
        except Exception as exc:  # a failed sweep retries on the next tick
            _log.warning("audit_checkpoint_sweep_failed", error=type(exc).__name__)
