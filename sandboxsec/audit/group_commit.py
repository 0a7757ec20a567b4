"""Group commit: one writer thread per process batches concurrent audit appends.

Callers without a transaction of their own hand their records to :class:`GroupCommit`, which
writes many callers' records in one transaction and acknowledges each caller only after that
transaction committed.  Between batches the thread signs checkpoints that fell due.

Tenants do not wait on each other: before writing, the batch's log heads are locked without
waiting (``busy``, PostgreSQL's ``FOR UPDATE SKIP LOCKED``); callers whose log head another
transaction holds are moved to a thread of their own for that set of logs, which waits for the
lock there, and everyone else commits at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from sandboxsec.audit.errors import AuditLogAlarmedError, AuditUnavailableError, StopsLog
from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.audit.store import log_id_of
from sandboxsec.errors import DependencyUnavailableError, SandboxSecError
from sandboxsec.storage.db import Database, DatabaseUnavailableError

__all__ = ["GroupCommit"]

_log = structlog.get_logger("sandboxsec.audit")

#: Most records one group-commit transaction carries.
_MAX_BATCH = 4096
#: Below this many queued callers, linger briefly for more to arrive.
_LINGER_BELOW = 32
_LINGER_SECONDS = 0.0005


#: Extra writes a caller has carried out in the next group-commit transaction.
Work = Callable[[Connection], None]


class _Pending:
    __slots__ = ("done", "error", "logs", "receipts", "records", "state", "work")

    QUEUED, TAKEN, CANCELLED, DEFERRED = 0, 1, 2, 3

    def __init__(
        self, records: list[AuditRecord], flush: frozenset[str], work: Work | None = None
    ) -> None:
        self.records = records
        self.work = work
        #: Every log this caller touches: its records' and those it asked to sequence.
        self.logs = frozenset(log_id_of(r) for r in records) | flush
        self.receipts: list[AuditReceipt] = []
        self.error: SandboxSecError | None = None
        # A held lock that the writer releases: cheaper than an Event (no condition inside).
        self.done = threading.Lock()
        self.done.acquire()
        self.state = _Pending.QUEUED


class GroupCommit:
    """One writer thread per process: batches concurrent appends into one transaction.

    Each caller waits for the commit of the transaction that holds its records.  A caller that
    times out is told the audit failed; if its records were not yet taken they are dropped,
    otherwise they may still commit (the log then over-reports an attempt, never under-reports).
    The thread also signs checkpoints for logs that have been idle past the checkpoint period.
    """

    def __init__(
        self,
        db: Database,
        write: Callable[[Connection, Sequence[AuditRecord], set[str]], list[AuditReceipt]],
        sweep: Callable[[], int],
        *,
        sweep_seconds: float,
        stop_timeout: float,
        busy: Callable[[Connection, set[str]], set[str]] | None = None,
        after_commit: Callable[[], None] | None = None,
        pending: Callable[[Connection, set[str]], set[str]] | None = None,
        wrote: Callable[[], bool] | None = None,
    ) -> None:
        """``busy(conn, log_ids)`` locks the heads it can without waiting and returns the ids
        another transaction holds (None: every head is waited for, as on SQLite).
        ``pending(conn, log_ids)`` returns those of ``log_ids`` with intents waiting: a log a
        caller only asked to sequence is not locked when there is nothing to sequence.
        ``wrote()`` says whether the last write changed anything; a batch that changed
        nothing rolls back (no commit to flush to disk)."""
        self._pending = pending
        self._wrote = wrote
        self._db = db
        self._busy = busy
        #: Pendings waiting for a head another transaction holds, by the set of their logs;
        #: a key is present exactly while a thread serves it.
        self._slow: dict[frozenset[str], deque[_Pending]] = {}
        self._write = write
        self._after_commit = after_commit
        self._sweep_due = sweep
        self._stop_timeout = stop_timeout
        self._cv = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sweep_seconds = max(0.05, sweep_seconds)

    def ensure_started(self) -> None:
        with self._cv:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(
                target=self._run, name="sandboxsec-audit-writer", daemon=True
            )
            self._thread.start()

    def submit(
        self, records: list[AuditRecord], timeout: float, flush: frozenset[str] = frozenset(),
        *, work: Work | None = None,
    ) -> list[AuditReceipt]:
        """Write ``records`` (and sequence the pending intents of the logs in ``flush``, and
        run ``work`` on the transaction's connection) in the next batch; return after its
        commit."""
        p = _Pending(records, flush, work)
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

    def on_writer_thread(self) -> bool:
        """Whether the caller is the writer thread (which must not wait for its own batch)."""
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=self._stop_timeout + 1)

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

    def _commit(self, batch: list[_Pending], cause: Exception | None = None) -> None:
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
                    self._commit([p], cause=exc)
                return
            if (isinstance(exc, AuditLogAlarmedError) and isinstance(cause, StopsLog)
                    and exc.log_id is not None and cause.log_id == exc.log_id):
                # The batch's own failure stopped this log a moment ago (the retry alone
                # then finds it stopped): its writers get that failure, with its reason.
                exc = cause
            _log.error("audit_write_failed", error=type(exc).__name__, records=len(batch))
            # Integrity refusals (503s of their own) keep their reason code.
            err = (
                exc
                if isinstance(exc, DependencyUnavailableError)
                else AuditUnavailableError(
                    "the audit log could not record this; the action was not carried out"
                )
            )
            for p in batch:
                p.error = err
                p.done.release()

    def _commit_once(self, batch: list[_Pending], *, wait: bool = False) -> None:
        # A bare Core transaction: the ORM session adds nothing here but per-commit overhead.
        with self._db.engine.connect() as conn, conn.begin() as tx:
            if self._pending is not None:
                only = {log for p in batch for log in p.logs}
                only -= {log_id_of(r) for p in batch for r in p.records}
                idle = only - self._pending(conn, only) if only else set()
                if idle:
                    # Another caller or node sequenced these already: nothing to lock.
                    for p in batch:
                        p.logs = p.logs - idle
            if not wait and self._busy is not None:
                busy = self._busy(conn, {log for p in batch for log in p.logs})
                if busy:
                    # Another transaction holds these heads: their callers wait on their own
                    # path; everyone else commits now (their heads are locked already).
                    stuck = [p for p in batch if not p.logs.isdisjoint(busy)]
                    batch = [p for p in batch if p not in stuck]
                    self._defer(stuck)
            records = [r for p in batch for r in p.records]
            logs = {log for p in batch for log in p.logs}
            # Called even with nothing to write: it starts the batch's bookkeeping afresh, so
            # what a failed transaction left behind is never taken for this one's.
            receipts = self._write(conn, records, logs)
            work = [p.work for p in batch if p.work is not None]
            for fn in work:
                fn(conn)
            if not records and not work and (
                not logs or (self._wrote is not None and not self._wrote())
            ):
                tx.rollback()
        if self._after_commit is not None:
            self._after_commit()
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
            key = p.logs
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
                    del self._slow[key]
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
            self._sweep_due()
        except Exception as exc:  # a failed sweep retries on the next tick
            _log.warning("audit_checkpoint_sweep_failed", error=type(exc).__name__)
