"""The writing side of the audit log: durable, totally ordered appends and checkpoint signing.

Contract (every domain service relies on it through :class:`~sandboxsec.audit.sink.AuditSink`):

* ``append(record, session=s)`` writes the entry in the caller's transaction, so the change
  and its entry commit (or roll back) together.  Use it whenever the caller has a transaction.
* ``append(record)`` hands the entry to the group-commit writer
  (:class:`~sandboxsec.audit.group_commit.GroupCommit`) that batches concurrent callers into
  one transaction and returns only after that transaction committed.  A caller waits at most
  ``write_timeout_seconds``; past it, or on any store failure, it gets
  :class:`AuditUnavailableError` (503) and must not carry out the action.
* Order is total per log across processes: every append locks the log's head row
  (:func:`~sandboxsec.audit.store.lock_head`).
* A checkpoint is signed only after the :class:`~sandboxsec.audit.integrity.HistoryGuard`
  proved the tree extends the last one this service signed; once its transaction committed,
  the guard records it outside the database and submits it to the witnesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from sandboxsec.audit.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from sandboxsec.audit.config import AuditConfig
from sandboxsec.audit.entry import encode_entry
from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.group_commit import GroupCommit
from sandboxsec.audit.integrity import HistoryGuard, SignedTree
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.merkle import Frontier
from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.audit.store import (
    ADVANCE_HEAD,
    ADVANCE_HEAD_SIGNED,
    HEADS,
    INSERT_CHECKPOINT,
    INSERT_ENTRIES,
    INSERT_NODES,
    NODE_MIN_HEIGHT,
    StoredCheckpoint,
    has_checkpoint,
    load_checkpoints,
    lock_free_heads,
    lock_head,
    log_id_of,
)
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.metrics import AUDIT_APPEND_SECONDS
from sandboxsec.storage.db import Database, DatabaseUnavailableError

__all__ = ["AuditWriter"]

_log = structlog.get_logger("sandboxsec.audit")


class AuditWriter:
    """Appends to every log of one service and signs their checkpoints."""

    def __init__(
        self, db: Database, clock: Clock, keys: AuditKeys, config: AuditConfig,
        guard: HistoryGuard,
    ) -> None:
        self._db = db
        self._clock = clock
        self._keys = keys
        self._config = config
        self.guard = guard
        # Checkpoints signed by the group-commit transaction in progress (writer thread only).
        self._unpublished: list[SignedTree] = []
        self._group = GroupCommit(
            db, self._group_write, self.sign_due_checkpoints,
            sweep_seconds=config.checkpoint_seconds,
            stop_timeout=config.write_timeout_seconds,
            busy=lambda conn, logs: lock_free_heads(conn, logs, self._clock.now()),
            after_commit=self._group_committed,
        )

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        """Durably append one record; raises :class:`AuditUnavailableError` when it cannot."""
        return self.append_many([record], session=session)[0]

    @AUDIT_APPEND_SECONDS.time()
    def append_many(
        self, records: Sequence[AuditRecord], *, session: Any | None = None
    ) -> list[AuditReceipt]:
        """Append records in order, in one transaction (the caller's when ``session`` given)."""
        if not records:
            return []
        if session is None:
            return self._group.submit(list(records), self._config.write_timeout_seconds)
        # The writer thread also signs time-based checkpoints, so start it on any append.
        self._group.ensure_started()
        try:
            # No checkpoint is signed inside the caller's transaction: the state file can only
            # move after a commit this code sees.  The next group commit or sweep signs.
            return self.write(session.connection(), records, signed=None)
        except SandboxSecError:
            raise
        except SQLAlchemyError as exc:
            raise AuditUnavailableError(
                "the audit log could not record this; the action was not carried out"
            ) from exc

    def _group_write(
        self, conn: Connection, records: Sequence[AuditRecord]
    ) -> list[AuditReceipt]:
        self._unpublished = []
        return self.write(conn, records, signed=self._unpublished)

    def _group_committed(self) -> None:
        trees, self._unpublished = self._unpublished, []
        if not trees:
            return
        try:
            # Committed: now the state files may move, and the witnesses hear of it.
            self.guard.published(trees, wait=False)
        except Exception as exc:  # the commit stands; a state left behind is still safe
            _log.error("audit_state_not_advanced", error=type(exc).__name__)

    def write(
        self,
        conn: Connection,
        records: Sequence[AuditRecord],
        *,
        signed: list[SignedTree] | None = None,
    ) -> list[AuditReceipt]:
        """Sequence and insert ``records`` on ``conn`` (inside its open transaction).

        Checkpoints that come due are signed (after the guard's check) and added to
        ``signed``, which the caller publishes once the transaction committed; with
        ``signed=None`` none is signed.
        """
        now = self._clock.now()
        by_log: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_log.setdefault(log_id_of(r), []).append(i)
        receipts: list[AuditReceipt | None] = [None] * len(records)
        # Logs are locked in sorted order so two multi-log batches cannot deadlock.
        for log_id in sorted(by_log):
            self.guard.ensure_open(log_id)
            head = lock_head(conn, log_id, now)
            frontier = Frontier.from_bytes(head.size, head.frontier)
            prev = head.last_leaf
            key = self._keys.hmac_key(log_id)
            rows = []
            leaves: list[bytes] = []
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
                leaves.append(e.leaf_hash)
                prev = e.leaf_hash
                receipts[i] = AuditReceipt(log_id=log_id, seq=e.seq)
            conn.execute(INSERT_ENTRIES, rows)
            if nodes:
                node_rows = [
                    {"tenant_id": log_id, "level": lv, "idx": ix, "hash": h}
                    for lv, ix, h in nodes
                ]
                conn.execute(INSERT_NODES, node_rows)
            values: dict[str, Any] = {
                "log_id": log_id,
                "new_size": frontier.size,
                "new_frontier": frontier.to_bytes(),
                "new_last_leaf": prev,
            }
            if signed is not None and (
                frontier.size - head.checkpoint_size >= self._config.checkpoint_every
                or now - head.checkpoint_at >= self._config.checkpoint_period
            ):
                self.guard.check(
                    conn, log_id, head_size=head.size, head_last_leaf=head.last_leaf,
                    new_leaves=leaves, frontier=frontier,
                )
                signed.append(SignedTree(log_id, self._sign(conn, log_id, frontier, now),
                                         frontier.copy(), prev))
                conn.execute(ADVANCE_HEAD_SIGNED, {**values, "signed_at": now})
            else:
                conn.execute(ADVANCE_HEAD, values)
        return [r for r in receipts if r is not None]

    def _sign(
        self, conn: Connection, log_id: str, frontier: Frontier, now: Any
    ) -> SignedCheckpoint:
        cp = Checkpoint(self._config.origin_of(log_id), frontier.size, frontier.root())
        signed = sign_checkpoint(cp, name=self._keys.key_name,
                                 private_key=self._keys.signing_key)
        conn.execute(
            INSERT_CHECKPOINT,
            {
                "tenant_id": log_id,
                "size": cp.size,
                "root_hash": cp.root_hash,
                "note": signed.note,
                "created_at": now,
            },
        )
        return signed

    def checkpoint_now(self, log_id: str, *, wait: bool = True) -> StoredCheckpoint:
        """The latest checkpoint, signing one first if entries were added since the last.

        With ``wait`` (a caller about to publish it) the witnesses are asked before returning;
        otherwise in the background."""
        now = self._clock.now()
        self.guard.ensure_open(log_id)
        signed: list[SignedTree] = []
        try:
            with self._db.session() as s:
                conn = s.connection()
                head = lock_head(conn, log_id, now)
                if head.size > head.checkpoint_size or not has_checkpoint(conn, log_id):
                    frontier = Frontier.from_bytes(head.size, head.frontier)
                    self.guard.check(
                        conn, log_id, head_size=head.size, head_last_leaf=head.last_leaf,
                        new_leaves=[], frontier=frontier,
                    )
                    cp = self._sign(conn, log_id, frontier, now)
                    signed.append(SignedTree(log_id, cp, frontier, head.last_leaf))
                    conn.execute(
                        update(HEADS)
                        .where(HEADS.c.id == log_id)
                        .values(checkpoint_size=head.size, checkpoint_at=now)
                    )
        except (SQLAlchemyError, DatabaseUnavailableError) as exc:
            raise AuditUnavailableError("the audit log cannot be read") from exc
        latest = load_checkpoints(self._db, log_id, newest_only=True)
        assert latest
        self.guard.publish_now(latest[0], signed, wait=wait)
        return latest[0]

    def sign_due_checkpoints(self) -> int:
        """Sign a checkpoint for every log with entries older than the checkpoint period."""
        now = self._clock.now()
        with self._db.session() as s:
            due = s.connection().execute(
                select(HEADS.c.id).where(
                    HEADS.c.size > HEADS.c.checkpoint_size,
                    HEADS.c.checkpoint_at <= now - self._config.checkpoint_period,
                )
            )
            ids = [r[0] for r in due]
        for log_id in ids:
            # The writer thread runs this sweep: it must not wait for witnesses.
            self.checkpoint_now(log_id, wait=False)
        if self.guard.publisher is not None:
            self.guard.publisher.refresh()
        return len(ids)

    def close(self) -> None:
        """Stop the group-commit writer (pending callers get their answer first), then the
        witness submitter."""
        self._group.stop()
        self.guard.close()
