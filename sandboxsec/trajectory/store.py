"""Every query on the trajectory tables, tenant-scoped in one place.

A record or session of another tenant is indistinguishable from none (404).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import insert
from sqlmodel import Session, col, select

from sandboxsec.crypto.errors import TrajectorySessionClosedError
from sandboxsec.errors import NotFoundError
from sandboxsec.sessions.liveness import is_live
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.tenancy import get_scoped
from sandboxsec.trajectory.models import TrajectoryRecord, TrajectorySegment

__all__ = [
    "add_segment",
    "open_session",
    "record_in_session",
    "segment",
    "segments",
    "session_records",
]


def open_session(s: Session, tenant_id: str, session_id: str, now: datetime) -> AgentSession:
    """The tenant's session, refused once it has ended or expired."""
    agent_session = get_scoped(s, AgentSession, tenant_id, session_id, what="session")
    if not is_live(agent_session, now):
        raise TrajectorySessionClosedError()
    return agent_session


def record_in_session(s: Session, tenant_id: str, session_id: str, record_id: str
                      ) -> TrajectoryRecord:
    """Record ``record_id`` of the tenant's session ``session_id`` (404 otherwise)."""
    row = get_scoped(s, TrajectoryRecord, tenant_id, record_id, what="record")
    if row.session_id != session_id:
        raise NotFoundError("no such record")
    return row


def session_records(s: Session, tenant_id: str, session_id: str, *, limit: int,
                    after: str | None, kind: str | None) -> list[TrajectoryRecord]:
    """The session's records (of ``kind``), oldest first, starting after record ``after``."""
    get_scoped(s, AgentSession, tenant_id, session_id, what="session")
    stmt = select(TrajectoryRecord).where(
        TrajectoryRecord.tenant_id == tenant_id,
        TrajectoryRecord.session_id == session_id,
    )
    if kind is not None:
        stmt = stmt.where(TrajectoryRecord.kind == kind)
    if after is not None:
        anchor = get_scoped(s, TrajectoryRecord, tenant_id, after, what="record")
        stmt = stmt.where(
            (col(TrajectoryRecord.created_at) > anchor.created_at)
            | ((col(TrajectoryRecord.created_at) == anchor.created_at)
               & (col(TrajectoryRecord.id) > anchor.id))
        )
    return list(s.exec(
        stmt.order_by(col(TrajectoryRecord.created_at), col(TrajectoryRecord.id)).limit(limit)
    ).all())


def segments(s: Session, row: TrajectoryRecord) -> list[bytes]:
    """Every ciphertext segment of a streamed record, in order (none for a sealed one)."""
    if row.layout != "stream":
        return []
    rows = s.exec(
        select(TrajectorySegment)
        .where(TrajectorySegment.record_id == row.id,
               TrajectorySegment.tenant_id == row.tenant_id)
        .order_by(col(TrajectorySegment.seq))
    ).all()
    return [r.data for r in rows]


def segment(s: Session, row: TrajectoryRecord, seq: int) -> bytes | None:
    """Segment ``seq`` of a streamed record, or None when it is missing."""
    seg = s.exec(
        select(TrajectorySegment).where(
            TrajectorySegment.record_id == row.id,
            TrajectorySegment.tenant_id == row.tenant_id,
            TrajectorySegment.seq == seq,
        )
    ).first()
    return seg.data if seg is not None else None


def add_segment(s: Session, tenant_id: str, record_id: str, seq: int, data: bytes) -> None:
    """Insert one ciphertext segment (a Core insert: no ORM object per segment)."""
    s.exec(
        insert(TrajectorySegment).values(
            id=f"{record_id}.{seq}", tenant_id=tenant_id, record_id=record_id, seq=seq, data=data,
        )
    )
