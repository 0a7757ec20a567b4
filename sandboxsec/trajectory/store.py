"""Every query on the trajectory tables, tenant-scoped in one place.

A record or session of another tenant is indistinguishable from none (404).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from sandboxsec.crypto.errors import TrajectorySessionClosedError
from sandboxsec.errors import NotFoundError
from sandboxsec.sessions.liveness import is_live
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.tenancy import get_scoped
from sandboxsec.trajectory.models import TrajectoryHead, TrajectoryRecord, TrajectorySegment
from sandboxsec.trajectory.order import SeqRange

__all__ = [
    "add_segment",
    "head_and_count",
    "next_seq",
    "open_session",
    "record_in_session",
    "segment",
    "segments",
    "seq_range",
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
    seq = col(TrajectoryRecord.seq)
    if after is not None:
        anchor = get_scoped(s, TrajectoryRecord, tenant_id, after, what="record")
        if anchor.seq is not None:
            stmt = stmt.where(seq > anchor.seq)
        else:
            # Records from before authenticated order come first, by time then id.
            stmt = stmt.where(
                seq.is_not(None)
                | (col(TrajectoryRecord.created_at) > anchor.created_at)
                | ((col(TrajectoryRecord.created_at) == anchor.created_at)
                   & (col(TrajectoryRecord.id) > anchor.id))
            )
    return list(s.exec(
        stmt.order_by(seq.is_not(None), seq, col(TrajectoryRecord.created_at),
                      col(TrajectoryRecord.id))
        .limit(limit)
    ).all())


_HEADS = TrajectoryHead.__table__  # type: ignore[attr-defined]


def next_seq(s: Session, tenant_id: str, session_id: str) -> int:
    """Take the session's next position; the head row stays locked until the commit, so
    positions are gap-free and a rolled-back write gives its position back."""
    conn = s.connection()
    fresh = {"session_id": session_id, "tenant_id": tenant_id, "next_seq": 0}
    ins = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    conn.execute(ins(_HEADS).values(**fresh).on_conflict_do_nothing())
    taken = conn.execute(
        update(_HEADS)
        .where(_HEADS.c.session_id == session_id, _HEADS.c.tenant_id == tenant_id)
        .values(next_seq=_HEADS.c.next_seq + 1)
        .returning(_HEADS.c.next_seq)
    ).scalar_one()
    return int(taken) - 1


def seq_range(s: Session, tenant_id: str, session_id: str, upto: int) -> SeqRange:
    """What the store holds for positions 0..``upto`` of a session (one aggregate query)."""
    seq = col(TrajectoryRecord.seq)
    n, distinct, lowest = s.exec(
        select(func.count(seq), func.count(func.distinct(seq)), func.min(seq))
        .where(TrajectoryRecord.tenant_id == tenant_id,
               TrajectoryRecord.session_id == session_id, seq.is_not(None), seq <= upto)
    ).one()
    return SeqRange(upto, int(n), int(distinct), lowest)


def head_and_count(s: Session, tenant_id: str, session_id: str) -> tuple[int, int] | None:
    """The session head's count of written records and how many ordered records remain,
    from one statement (one snapshot); None when the session has no head yet."""
    seq = col(TrajectoryRecord.seq)
    stored = (select(func.count(seq))
              .where(TrajectoryRecord.tenant_id == tenant_id,
                     TrajectoryRecord.session_id == session_id, seq.is_not(None))
              .scalar_subquery())
    found = s.exec(
        select(TrajectoryHead.next_seq, stored).where(
            TrajectoryHead.session_id == session_id, TrajectoryHead.tenant_id == tenant_id,
        )
    ).first()
    return (int(found[0]), int(found[1])) if found is not None else None


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
