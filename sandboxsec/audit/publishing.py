"""Wiring of the history guard and the witnesses into the audit log (its storage side).

Kept apart from :mod:`sandboxsec.audit.log` so the writer stays about sequencing and
committing: this module builds the :class:`~sandboxsec.audit.integrity.HistoryGuard` from the
settings, stores the cosignatures witnesses return, and publishes a checkpoint synchronously
when a caller (the checkpoint API, an export) needs it cosigned now.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError

from sandboxsec.audit.checkpoint import Checkpoint
from sandboxsec.audit.cosignature import Cosignature, parse_witness_key
from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.integrity import HistoryGuard, SignedTree
from sandboxsec.audit.models import AuditCosignatureRow
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord
from sandboxsec.audit.signed_state import Alarm, StateFiles
from sandboxsec.audit.witness_client import WitnessEndpoint, WitnessPublisher
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.settings import Settings

if TYPE_CHECKING:
    from sandboxsec.audit.log import AuditLog, StoredCheckpoint

__all__ = ["build_guard", "publish_now", "stored_cosignatures"]

_COSIGS = AuditCosignatureRow.__table__  # type: ignore[attr-defined]
_log = structlog.get_logger("sandboxsec.audit")


def build_guard(log: AuditLog, settings: Settings, clock: Clock) -> HistoryGuard:
    """The guard of ``log``: state files under ``<home>/audit``, the configured witnesses."""
    states = StateFiles(settings.home / "audit", log.keys.state_key)
    publisher = None
    if settings.audit_witnesses:
        endpoints = [
            WitnessEndpoint(w.url, parse_witness_key(w.key)) for w in settings.audit_witnesses
        ]
        holder: list[HistoryGuard] = []
        publisher = WitnessPublisher(
            endpoints,
            timeout=settings.audit_witness_timeout_seconds,
            proof=lambda log_id, old, new: log.tree(log_id, new).consistency_proof(old, new),
            on_cosigned=lambda log_id, size, cos: store_cosignatures(log, log_id, size, cos),
            on_refused=lambda log_id, w, msg: holder[0].witness_refused(log_id, w, msg),
            newest=lambda log_id: newest_checkpoint_size(log, log_id),
        )
    guard = HistoryGuard(states, clock=clock, publisher=publisher,
                         on_alarm=lambda alarm: record_alarm(log, alarm))
    if publisher is not None:
        holder.append(guard)
    return guard


def record_alarm(log: AuditLog, alarm: Alarm) -> None:
    """Record the alarm in the service's own log, from another thread: it is raised inside
    an appending transaction, which a synchronous append would wait on."""
    if alarm.log_id == SERVICE_LOG:
        return  # that log is the one stopped; the marker file and the error log remain

    def append() -> None:
        try:
            log.append(AuditRecord.by(
                None, AuditEvent.AUDIT_ALARM, "alarm", reason=alarm.code,
                object_ids={"log_id": alarm.log_id}, body={"message": alarm.message},
            ))
        except SandboxSecError as exc:
            _log.error("audit_alarm_not_recorded", log_id=alarm.log_id, code=exc.reason)

    threading.Thread(target=append, name="sandboxsec-audit-alarm", daemon=True).start()


def newest_checkpoint_size(log: AuditLog, log_id: str) -> int:
    """The largest signed checkpoint size stored for ``log_id`` (0 when none)."""
    latest = log.latest_checkpoint(log_id)
    return latest.size if latest is not None else 0


def store_cosignatures(log: AuditLog, log_id: str, size: int, cos: Sequence[Cosignature]) -> None:
    """Keep verified cosignature lines beside their checkpoint (the newest per witness)."""
    if not cos:
        return
    now = log._s.clock.now()
    rows = [
        {"tenant_id": log_id, "size": size, "witness": c.witness, "line": c.line,
         "created_at": now}
        for c in cos
    ]
    with log._s.db.engine.begin() as conn:
        stmt = (sqlite_insert if conn.dialect.name == "sqlite" else pg_insert)(_COSIGS)
        stmt = stmt.values(rows)
        # A resubmission brings a fresher cosignature of the same tree: keep the newest.
        conn.execute(stmt.on_conflict_do_update(
            index_elements=["tenant_id", "size", "witness"],
            set_={"line": stmt.excluded.line, "created_at": stmt.excluded.created_at},
        ))


def stored_cosignatures(log: AuditLog, log_id: str, size: int | None) -> dict[int, list[str]]:
    """Cosignature lines of ``log_id`` by checkpoint size (one size when given)."""
    q = select(_COSIGS.c.size, _COSIGS.c.line).where(_COSIGS.c.tenant_id == log_id)
    if size is not None:
        q = q.where(_COSIGS.c.size == size)
    out: dict[int, list[str]] = {}
    try:
        with log._read() as conn:
            for r in conn.execute(q.order_by(_COSIGS.c.size, _COSIGS.c.witness)):
                out.setdefault(int(r[0]), []).append(str(r[1]))
    except SQLAlchemyError as exc:
        raise AuditUnavailableError("the audit log cannot be read") from exc
    return out


def publish_now(
    log: AuditLog,
    log_id: str,
    latest: StoredCheckpoint,
    signed: Sequence[SignedTree],
    *,
    wait: bool = True,
) -> None:
    """After ``checkpoint_now`` committed: advance the state, and get the newest checkpoint
    cosigned by every witness before answering (a witness that does not answer in time is
    skipped; the checkpoint is published without its cosignature)."""
    guard = log.guard
    if signed or not wait:
        guard.published(signed, wait=wait)
        return
    if guard.publisher is None:
        return
    have = log.cosignatures(log_id, latest.size).get(latest.size, [])
    if len(have) < len(guard.publisher.endpoints):
        guard.publisher.submit(
            log_id, latest.note, Checkpoint(log.origin(log_id), latest.size, latest.root_hash)
        )
