"""The service never signs an altered past: checks before signing, publication after commit.

:class:`HistoryGuard` sits between the audit log's writer and its signing key:

* before a checkpoint is signed (inside the appending transaction, holding the log's head
  lock) :meth:`~HistoryGuard.check` proves that the tree about to be signed extends the last
  tree this service signed, as held in the state file outside the database
  (:mod:`~sandboxsec.audit.signed_state`);
* after the transaction committed, :meth:`~HistoryGuard.published` advances the state file and
  submits the checkpoint to the witnesses (:mod:`~sandboxsec.audit.witness_client`);
* any mismatch, an invalid state file or a witness that has seen another past raises an alarm:
  a marker file (shared by every worker), an error in the service log, ``/healthz`` and
  ``/metrics``; the log is then closed for appends and signatures (fail closed) until an
  operator clears it (``sandboxsec audit alarm --clear``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.engine import Connection

from sandboxsec.audit.checkpoint import SignedCheckpoint, parse_signed_checkpoint
from sandboxsec.audit.cosignature import Cosignature
from sandboxsec.audit.errors import (
    AuditHistoryMismatchError,
    AuditLogAlarmedError,
    AuditStateInvalidError,
)
from sandboxsec.audit.merkle import Frontier
from sandboxsec.audit.recent_tree import RecentTrees
from sandboxsec.audit.signed_state import Alarm, SignedState, StateFiles, check_extends
from sandboxsec.audit.store import ENTRIES, StoredCheckpoint
from sandboxsec.audit.witness_client import WitnessPublisher
from sandboxsec.clock import Clock

__all__ = ["HistoryGuard", "SignedTree"]

_log = structlog.get_logger("sandboxsec.audit")
_ENTRIES = ENTRIES


@dataclass(frozen=True, slots=True)
class SignedTree:
    """A checkpoint signed in a transaction, with the tree it covers (published on commit)."""

    log_id: str
    signed: SignedCheckpoint
    frontier: Frontier
    last_leaf: bytes | None


class HistoryGuard:
    """Checks before signing, state and witnesses after commit, alarms (see module doc)."""

    def __init__(
        self,
        states: StateFiles,
        *,
        clock: Clock,
        publisher: WitnessPublisher | None = None,
        on_alarm: Callable[[Alarm], None] | None = None,
        count_cosignatures: Callable[[str, int], int] | None = None,
        recent: RecentTrees | None = None,
    ) -> None:
        self.states = states
        self.publisher = publisher
        #: The newest committed leaves per log, which the writer feeds after each commit and
        #: the witness proofs are built from (None: proofs come from the stored tree).
        self.recent = recent
        self._clock = clock
        self._on_alarm = on_alarm
        self._count_cosignatures = count_cosignatures

    # -------------------------------------------------------------------- before signing

    def ensure_open(self, log_id: str) -> None:
        """Refuse to touch a log that an alarm stopped (in this or any other worker)."""
        alarm = self.states.alarm(log_id)
        if alarm is not None:
            stopped = AuditLogAlarmedError(
                f"the audit log is stopped by an integrity alarm ({alarm.code}); nothing is "
                "recorded or signed until an operator clears it"
            )
            stopped.log_id = log_id
            raise stopped

    def check(
        self,
        conn: Connection,
        log_id: str,
        *,
        head_size: int,
        head_last_leaf: bytes | None,
        new_leaves: Sequence[bytes],
        frontier: Frontier,
    ) -> None:
        """Raise (and alarm) unless ``frontier`` extends the last tree signed for ``log_id``.

        ``head_size`` / ``head_last_leaf`` are what the database's head said before this
        transaction's entries (``new_leaves``) were appended; ``frontier`` is the tree after.
        """
        try:
            state = self.states.load(log_id)
        except AuditStateInvalidError as exc:
            self.alarm(log_id, exc.reason, exc.message)
            exc.log_id = log_id
            raise
        if state is None:
            # First checkpoint of this log on this service home: trusted on first use.
            return
        try:
            if head_size < state.size:
                raise AuditHistoryMismatchError(
                    f"log {log_id} has {head_size} stored entries, fewer than the {state.size} "
                    "this service signed"
                )
            q = (
                select(_ENTRIES.c.seq, _ENTRIES.c.entry, _ENTRIES.c.leaf_hash)
                .where(
                    _ENTRIES.c.tenant_id == log_id,
                    _ENTRIES.c.seq >= state.size,
                    _ENTRIES.c.seq < head_size,
                )
                .order_by(_ENTRIES.c.seq)
            )
            stored = [
                (int(r[0]), r[1].encode("ascii") if isinstance(r[1], str) else bytes(r[1]),
                 bytes(r[2]))
                for r in conn.execute(q)
            ]
            check_extends(
                state, stored, new_leaves, head_last_leaf, frontier.size, frontier.root()
            )
        except (AuditHistoryMismatchError, UnicodeEncodeError) as exc:
            message = getattr(exc, "message", "an entry is not ASCII")
            self.alarm(log_id, AuditHistoryMismatchError.code, message)
            mismatch = (exc if isinstance(exc, AuditHistoryMismatchError)
                        else AuditHistoryMismatchError(message))
            mismatch.log_id = log_id
            if mismatch is exc:
                raise
            raise mismatch from exc

    # ---------------------------------------------------------------------- after commit

    def published(self, trees: Sequence[SignedTree], *, wait: bool) -> list[Cosignature]:
        """Advance the state files, then submit to the witnesses (now, or in the background)."""
        got: list[Cosignature] = []
        for t in trees:
            cp = t.signed.checkpoint
            self.states.advance(
                SignedState(
                    log_id=t.log_id,
                    size=cp.size,
                    root_hash=cp.root_hash,
                    frontier=tuple(t.frontier.hashes or ()),
                    last_leaf=t.last_leaf,
                    note=t.signed.note,
                )
            )
            if self.publisher is not None:
                if wait:
                    got.extend(self.publisher.submit(t.log_id, t.signed.note, cp))
                else:
                    self.publisher.submit_later(t.log_id, t.signed.note, cp)
        return got

    def publish_now(
        self, latest: StoredCheckpoint, signed: Sequence[SignedTree], *, wait: bool
    ) -> None:
        """After ``checkpoint_now`` committed: advance the state; with ``wait``, also get the
        newest checkpoint cosigned by every witness before answering (one that does not answer
        in time is skipped: the checkpoint is published without its cosignature)."""
        if signed or not wait:
            self.published(signed, wait=wait)
            return
        if self.publisher is None or self._count_cosignatures is None:
            return
        if self._count_cosignatures(latest.log_id, latest.size) < len(self.publisher.endpoints):
            cp, _ = parse_signed_checkpoint(latest.note)
            self.publisher.submit(latest.log_id, latest.note, cp)

    # ---------------------------------------------------------------------------- alarms

    def alarm(self, log_id: str, code: str, message: str) -> None:
        """Stop ``log_id`` and say so loudly (service log, health, metrics)."""
        first = self.states.alarm(log_id) is None
        alarm = self.states.raise_alarm(log_id, code, message, self._clock.now())
        _log.error("audit_integrity_alarm", log_id=log_id, code=code, message=message)
        if first and self._on_alarm is not None:
            self._on_alarm(alarm)

    def witness_refused(self, log_id: str, witness: str, message: str) -> None:
        """A witness has seen another past of ``log_id``: alarm."""
        self.alarm(log_id, "audit_witness_refused", message)

    def close(self) -> None:
        """Stop the background witness submitter."""
        if self.publisher is not None:
            self.publisher.close()

