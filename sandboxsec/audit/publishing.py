"""Storage and wiring around the history guard: cosignature rows, the guard's construction.

Kept apart from the writer (:mod:`sandboxsec.audit.writer`) so it stays about sequencing and
committing: this module stores the cosignatures witnesses return, reads them back for the
reader and the API, and builds the :class:`~sandboxsec.audit.integrity.HistoryGuard` with its
state files and witness publisher from the settings (called by the composition root).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import structlog

from sandboxsec.audit.cosignature import Cosignature, parse_witness_key
from sandboxsec.audit.cosignature_store import store_cosignatures, stored_cosignatures
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.integrity import HistoryGuard
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.recent_tree import RecentTrees
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord
from sandboxsec.audit.signed_state import Alarm, StateFiles
from sandboxsec.audit.sink import AuditSink
from sandboxsec.audit.store import load_checkpoints
from sandboxsec.audit.witness_client import WitnessEndpoint, WitnessPublisher
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database

__all__ = ["CosignatureKeeper", "build_guard", "record_alarm"]

_log = structlog.get_logger("sandboxsec.audit")

ProofFn = Callable[[str, int, int], list[bytes]]


@runtime_checkable
class CosignatureKeeper(Protocol):
    """Stores verified cosignatures with its own transactions (the audit writer does, in its
    group commits)."""

    def store_cosignatures(self, log_id: str, size: int, cos: Sequence[Cosignature]) -> None:
        """Store the cosignatures of checkpoint ``size`` of ``log_id``; return once durable."""
        ...


def build_guard(
    settings: Settings,
    db: Database,
    clock: Clock,
    keys: AuditKeys,
    *,
    proof: ProofFn,
    sink: Callable[[], AuditSink],
) -> HistoryGuard:
    """The guard: state files under ``<home>/audit``, the configured witnesses.

    ``proof(log_id, old, new)`` builds a consistency proof from the stored tree; the
    witnesses get theirs from the leaves the writer just committed when it still holds them
    (:class:`~sandboxsec.audit.recent_tree.RecentTrees`), from ``proof`` otherwise.  ``sink()``
    gives the audit writer that records alarms in the service log (late-bound: the writer is
    built with this guard).
    """
    states = StateFiles(settings.home / "audit", keys.state_key)
    publisher = None
    recent = None
    holder: list[HistoryGuard] = []
    if settings.audit_witnesses:
        # Room for a few checkpoints' worth of leaves: a witness's size is nearly always the
        # previous checkpoint (bounded: about 2 MiB per log at most).
        recent = RecentTrees(
            max_leaves=min(65536, max(2048, 4 * settings.audit_checkpoint_every)))
        kept = recent

        def witness_proof(log_id: str, old: int, new: int) -> list[bytes]:
            found = kept.consistency_proof(log_id, old, new)
            return found if found is not None else proof(log_id, old, new)

        endpoints = [
            WitnessEndpoint(w.url, parse_witness_key(w.key)) for w in settings.audit_witnesses
        ]
        publisher = WitnessPublisher(
            endpoints,
            timeout=settings.audit_witness_timeout_seconds,
            proof=witness_proof,
            on_cosigned=lambda log_id, size, cos: _keep(sink(), db, clock, log_id, size, cos),
            on_refused=lambda log_id, w, msg: holder[0].witness_refused(log_id, w, msg),
            newest=lambda log_id: _newest_size(db, log_id),
        )
    guard = HistoryGuard(
        states, clock=clock, publisher=publisher,
        on_alarm=lambda alarm: record_alarm(sink(), alarm),
        count_cosignatures=lambda log_id, size: len(
            stored_cosignatures(db, log_id, size).get(size, [])),
        recent=recent,
    )
    holder.append(guard)
    return guard


def _keep(
    sink: AuditSink, db: Database, clock: Clock, log_id: str, size: int,
    cos: Sequence[Cosignature],
) -> None:
    # The writer stores them in its next group commit; another sink, in a transaction of
    # their own.
    if isinstance(sink, CosignatureKeeper):
        sink.store_cosignatures(log_id, size, cos)
    else:
        store_cosignatures(db, clock, log_id, size, cos)


def record_alarm(sink: AuditSink, alarm: Alarm) -> None:
    """Record the alarm in the service's own log, from another thread: it is raised inside
    an appending transaction, which a synchronous append would wait on."""
    if alarm.log_id == SERVICE_LOG:
        return  # that log is the one stopped; the marker file and the error log remain

    def append() -> None:
        try:
            sink.append(AuditRecord.by(
                None, AuditEvent.AUDIT_ALARM, "alarm", reason=alarm.code,
                object_ids={"log_id": alarm.log_id}, body={"message": alarm.message},
            ))
        except SandboxSecError as exc:
            _log.error("audit_alarm_not_recorded", log_id=alarm.log_id, code=exc.reason)

    threading.Thread(target=append, name="sandboxsec-audit-alarm", daemon=True).start()


def _newest_size(db: Database, log_id: str) -> int:
    latest = load_checkpoints(db, log_id, newest_only=True)
    return latest[0].size if latest else 0
