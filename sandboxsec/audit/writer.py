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
* With deferred sequencing (the default on PostgreSQL, where several nodes share a tenant's
  log), ``append(record, session=s)`` takes no lock: it inserts an *append intent*
  (``audit_pending``) in the caller's transaction, so the change and its record still commit
  or roll back together, and the receipt says ``pending``.  Once that transaction is over,
  the caller hands the log to the group-commit writer, which, holding the head once for the
  whole batch of every caller and node, moves the intents into the log in intent order.  An
  intent that no one sequenced (its process died) is sequenced by the next writer that takes
  the head, by any node's periodic sweep, or before an export or a checkpoint.
* A checkpoint is signed only after the :class:`~sandboxsec.audit.integrity.HistoryGuard`
  proved the tree extends the last one this service signed; once its transaction committed,
  the guard records it outside the database and submits it to the witnesses.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from sandboxsec.audit.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from sandboxsec.audit.config import AuditConfig
from sandboxsec.audit.cosignature import Cosignature
from sandboxsec.audit.cosignature_store import insert_cosignatures
from sandboxsec.audit.entry import encode_tail, entry_line
from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.group_commit import GroupCommit
from sandboxsec.audit.integrity import HistoryGuard, SignedTree
from sandboxsec.audit.key_pin import check_checkpoint_key
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.merkle import Frontier, leaf_hash
from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.audit.store import (
    ADVANCE_HEAD,
    ADVANCE_HEAD_SIGNED,
    HEADS,
    INSERT_CHECKPOINT,
    INSERT_NODES,
    INSERT_PENDING,
    NODE_MIN_HEIGHT,
    Head,
    StoredCheckpoint,
    has_checkpoint,
    insert_entries,
    load_checkpoints,
    lock_free_heads,
    lock_head,
    log_id_of,
    logs_with_pending,
    pending_logs,
    take_pending,
    try_lock_head,
)
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.metrics import AUDIT_APPEND_SECONDS
from sandboxsec.storage.db import Database, DatabaseUnavailableError, after_commit

__all__ = ["AuditWriter"]

_log = structlog.get_logger("sandboxsec.audit")

#: ``session.info`` key: the logs a transaction left intents in (sequenced after it).
_PENDING_LOGS = "sandboxsec.audit.pending_logs"


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
        #: Appends in a caller's transaction leave intents instead of locking the head.
        self.deferred = (config.deferred if config.deferred is not None
                         else db.engine.dialect.name == "postgresql")
        #: Logs whose last sequencing step failed: they take no more intents until one works,
        #: so a broken log stops actions (fail closed) instead of piling up a backlog.
        self._stalled: set[str] = set()
        # Per group-commit thread (the writer and its busy-head threads run at once): the
        # checkpoints its transaction signed and whether it added entries.
        self._batch = threading.local()
        self._group = GroupCommit(
            db, self._group_write, self.sign_due_checkpoints,
            sweep_seconds=config.checkpoint_seconds,
            stop_timeout=config.write_timeout_seconds,
            busy=lambda conn, logs: lock_free_heads(conn, logs, self._clock.now()),
            after_commit=self._group_committed,
            pending=lambda conn, logs: logs_with_pending(conn, logs) if self.deferred else logs,
            wrote=lambda: bool(getattr(self._batch, "wrote", False)),
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
            if self.deferred:
                return self._intend(session, records)
            # No checkpoint is signed inside the caller's transaction: the state file can only
            # move after a commit this code sees.  The next group commit or sweep signs.
            return self.write(session.connection(), records, signed=None)
        except SandboxSecError:
            raise
        except SQLAlchemyError as exc:
            raise AuditUnavailableError(
                "the audit log could not record this; the action was not carried out"
            ) from exc

    def _intend(self, session: Any, records: Sequence[AuditRecord]) -> list[AuditReceipt]:
        """Insert ``records`` as append intents in the caller's transaction (no head lock)."""
        now = self._clock.now()
        rows = []
        receipts = []
        for r in records:
            log_id = log_id_of(r)
            self.guard.ensure_open(log_id)
            if log_id in self._stalled:
                self.sequence(log_id)  # raises while the log still cannot advance
            rows.append({"tenant_id": log_id, "event": str(r.event)[:64], "created_at": now,
                         "tail": encode_tail(r, hmac_key=self._keys.hmac_key(log_id))})
            receipts.append(AuditReceipt(log_id=log_id, seq=-1, pending=True))
        session.connection().execute(INSERT_PENDING, rows)
        logs: set[str] | None = session.info.get(_PENDING_LOGS)
        if logs is None:
            logs = session.info[_PENDING_LOGS] = set()
            after_commit(session, lambda: self._sequence_after(session))
        logs.update(r.log_id for r in receipts)
        return receipts

    def _sequence_after(self, session: Any) -> None:
        # The caller's transaction committed and its connection is back in the pool: have
        # the group-commit writer sequence its intents (with everyone else's) before the
        # caller answers.  A failure here loses nothing: the intents are committed and the
        # next head holder or the sweep sequences them; the action already stands.
        logs = frozenset(session.info.pop(_PENDING_LOGS, ()))
        if not logs:
            return
        try:
            self._group.submit([], self._config.write_timeout_seconds, flush=logs)
        except Exception as exc:
            self._stalled.update(logs)
            _log.warning("audit_sequencing_deferred", error=type(exc).__name__,
                         logs=len(logs))
        else:
            self._stalled.difference_update(logs)

    def sequence(self, log_id: str) -> None:
        """Sequence the committed intents of ``log_id`` now (readers call this first, so
        they see every acknowledged record).  Raises :class:`AuditUnavailableError`."""
        if self.deferred:
            try:
                self._group.submit([], self._config.write_timeout_seconds,
                                   flush=frozenset({log_id}))
            except Exception:
                self._stalled.add(log_id)
                raise
            self._stalled.discard(log_id)

    def _group_write(
        self, conn: Connection, records: Sequence[AuditRecord], logs: set[str]
    ) -> list[AuditReceipt]:
        self._batch.unpublished = []
        self._batch.wrote = False
        self._batch.extended = []
        return self.write(conn, records, signed=self._batch.unpublished, flush=logs)

    def _group_committed(self) -> None:
        trees: list[SignedTree] = getattr(self._batch, "unpublished", [])
        self._batch.unpublished = []
        extended: list[tuple[str, int, bytes, list[bytes], bytes]] | None = getattr(
            self._batch, "extended", None)
        self._batch.extended = None
        if extended and self.guard.recent is not None:
            # Committed: these leaves may now serve the witnesses' consistency proofs.
            try:
                for log_id, size, start, leaves, end in extended:
                    self.guard.recent.committed(log_id, size, start, leaves, end)
            except Exception as exc:  # the commit stands; proofs then come from the store
                _log.warning("audit_recent_tree_not_kept", error=type(exc).__name__)
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
        flush: set[str] | frozenset[str] = frozenset(),
    ) -> list[AuditReceipt]:
        """Sequence ``records`` on ``conn`` (inside its open transaction), after the pending
        intents of their logs and of the logs in ``flush``.

        Checkpoints that come due are signed (after the guard's check) and added to
        ``signed``, which the caller publishes once the transaction committed; with
        ``signed=None`` none is signed.
        """
        now = self._clock.now()
        by_log: dict[str, list[int]] = {log_id: [] for log_id in flush}
        for i, r in enumerate(records):
            by_log.setdefault(log_id_of(r), []).append(i)
        receipts: list[AuditReceipt | None] = [None] * len(records)
        # Logs are locked in sorted order so two multi-log batches cannot deadlock.
        for log_id in sorted(by_log):
            self.guard.ensure_open(log_id)
            head = lock_head(conn, log_id, now)
            if self._extend(conn, log_id, head, now, records, by_log[log_id], receipts, signed):
                self._batch.wrote = True
        return [r for r in receipts if r is not None]

    def _extend(
        self,
        conn: Connection,
        log_id: str,
        head: Head,
        now: Any,
        records: Sequence[AuditRecord],
        indexes: Sequence[int],
        receipts: list[AuditReceipt | None],
        signed: list[SignedTree] | None,
    ) -> int:
        """Append to ``log_id`` (its head locked on ``conn``) its pending intents, then
        ``records[i]`` for ``i`` in ``indexes``; returns how many entries were added."""
        key = self._keys.hmac_key(log_id)
        # (event, tail, index of the caller's record or -1 for an intent)
        items: list[tuple[str, str, int]] = []
        if self.deferred:
            items = [(ev, tail, -1) for ev, tail in take_pending(conn, log_id)]
        items.extend(
            (str(records[i].event)[:64], encode_tail(records[i], hmac_key=key), i)
            for i in indexes
        )
        if not items:
            return 0
        frontier = Frontier.from_bytes(head.size, head.frontier)
        prev = head.last_leaf
        rows: list[tuple[int, str, str, bytes]] = []
        leaves: list[bytes] = []
        nodes: list[tuple[int, int, bytes]] = []
        for event, tail, i in items:
            seq = frontier.size
            line = entry_line(log_id=log_id, seq=seq, prev=prev, now=now, tail=tail)
            h = leaf_hash(line)
            rows.append((seq, event, line.decode("ascii"), h))
            frontier.append_recording(h, nodes, NODE_MIN_HEIGHT)
            leaves.append(h)
            prev = h
            if i >= 0:
                receipts[i] = AuditReceipt(log_id=log_id, seq=seq)
        insert_entries(conn, log_id, now, rows)
        if nodes:
            node_rows = [
                {"tenant_id": log_id, "level": lv, "idx": ix, "hash": h}
                for lv, ix, h in nodes
            ]
            conn.execute(INSERT_NODES, node_rows)
        end = frontier.to_bytes()
        values: dict[str, Any] = {
            "log_id": log_id,
            "new_size": frontier.size,
            "new_frontier": end,
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
        extended = getattr(self._batch, "extended", None)
        if extended is not None and signed is not None:
            # A group-commit transaction: once it committed, these leaves serve witness proofs.
            extended.append((log_id, head.size, head.frontier, leaves, end))
        head.size, head.frontier, head.last_leaf = frontier.size, end, prev
        return len(items)

    def _sign(
        self, conn: Connection, log_id: str, frontier: Frontier, now: Any
    ) -> SignedCheckpoint:
        cp = Checkpoint(self._config.origin_of(log_id), frontier.size, frontier.root())
        # A log never receives a checkpoint signed by a key other than its own.
        check_checkpoint_key(conn, log_id, self._keys.public_key, self._keys.key_name)
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
                # Intents committed by now are covered by this checkpoint.
                self._extend(conn, log_id, head, now, (), (), [], None)
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

    def store_cosignatures(self, log_id: str, size: int, cos: Sequence[Cosignature]) -> None:
        """Store verified witness cosignatures of checkpoint ``size``; returns once committed.

        They ride in the next group-commit transaction (with whatever appends it carries)
        instead of committing, and flushing to disk, on their own.  Readers see them, and
        exports publish them, only once that transaction committed; a crash before it loses
        nothing a witness cannot give again (the witness keeps its own durable state; the
        next submission learns its size from a 409 and the newest checkpoint is resubmitted
        when it lacks cosignatures)."""
        if not cos:
            return

        def work(conn: Connection) -> None:
            insert_cosignatures(conn, self._clock.now(), log_id, size, cos)

        if self._group.on_writer_thread():  # it cannot wait for its own next batch
            try:
                with self._db.connection() as conn:
                    work(conn)
            except (SQLAlchemyError, DatabaseUnavailableError) as exc:
                raise AuditUnavailableError("the cosignatures could not be stored") from exc
            return
        self._group.submit([], self._config.write_timeout_seconds, work=work)

    def sign_due_checkpoints(self) -> int:
        """Sign a checkpoint for every log with entries older than the checkpoint period."""
        now = self._clock.now()
        if self.deferred:
            self._sequence_orphans()
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

    def _sequence_orphans(self) -> None:
        """Sequence intents nobody sequenced (their process died between its commit and the
        sequencing step).  Skips heads another transaction holds: that holder sequences."""
        with self._db.engine.begin() as conn:
            logs = pending_logs(conn)
        for log_id in logs:
            signed: list[SignedTree] = []
            try:
                self.guard.ensure_open(log_id)
                with self._db.engine.begin() as conn:
                    head = try_lock_head(conn, log_id, self._clock.now())
                    if head is not None:
                        self._extend(conn, log_id, head, self._clock.now(), (), (), [], signed)
                if signed:
                    self.guard.published(signed, wait=False)
                if head is not None:
                    self._stalled.discard(log_id)
            except Exception as exc:  # the next sweep retries; one log must not stop others
                self._stalled.add(log_id)
                _log.warning("audit_sequencing_deferred", error=type(exc).__name__)

    def close(self) -> None:
        """Stop the group-commit writer (pending callers get their answer first), then the
        witness submitter."""
        self._group.stop()
        self.guard.close()
