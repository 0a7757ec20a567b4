"""Tables of encrypted trajectories: records and the segments of streamed records.

Metadata and data are ciphertext sealed under a DEK of the key hierarchy
(:mod:`sandboxsec.crypto`); what stays in clear is what must stay searchable: time, kind,
size and content hash.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["TrajectoryRecord", "TrajectorySegment"]


class TrajectoryRecord(SQLModel, table=True):
    """One encrypted trajectory record; ``meta_sealed`` and the data are ciphertext.

    ``layout`` is ``sealed`` (``data`` holds one sealed record) or ``stream`` (``data`` holds
    the stream header, the segments are :class:`TrajectorySegment` rows).
    """

    __tablename__ = "trajectory_records"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    session_id: str = Field(index=True, max_length=40)
    created_at: datetime = Field(sa_type=UTCDateTime, index=True)
    created_by: str = Field(default="", max_length=40)
    kind: str = Field(max_length=64, index=True)
    size: int
    content_sha256: str = Field(max_length=64)
    dek_id: str = Field(index=True, max_length=40)
    layout: str = Field(max_length=8)
    segment_count: int = Field(default=0)
    meta_sealed: bytes = Field(sa_type=LargeBinary)
    data: bytes = Field(sa_type=LargeBinary)


class TrajectorySegment(SQLModel, table=True):
    """One ciphertext segment of a streamed record, in order ``seq`` from 0."""

    __tablename__ = "trajectory_segments"
    __table_args__ = (UniqueConstraint("record_id", "seq", name="uq_trajectory_segments_seq"),)

    id: str = Field(primary_key=True, max_length=60)
    tenant_id: str = Field(index=True, max_length=40)
    record_id: str = Field(index=True, max_length=40)
    seq: int
    data: bytes = Field(sa_type=LargeBinary)
