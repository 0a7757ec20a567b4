"""Tables of the audit log: entries, one head row per log, signed checkpoints.

``tenant_id`` is the log id: the tenant's id for tenant logs, ``_service`` for the service's
own operations.  Entries are append-only by contract; nothing in the code updates or deletes
them, and any change made behind the service's back is what verification detects.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = [
    "AuditCheckpointRow",
    "AuditCosignatureRow",
    "AuditEntryRow",
    "AuditHeadRow",
    "AuditNodeRow",
    "AuditPendingRow",
]


class AuditEntryRow(SQLModel, table=True):
    """One entry: its canonical line (what the leaf hashes) and the leaf hash itself."""

    __tablename__ = "audit_entries"
    __table_args__ = (
        UniqueConstraint("tenant_id", "seq", name="uq_audit_entries_log_seq"),
        Index("ix_audit_entries_log_event", "tenant_id", "event"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    seq: int
    event: str = Field(max_length=64)
    time: datetime = Field(sa_type=UTCDateTime)
    entry: str = Field(sa_column=Column(Text, nullable=False))
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class AuditHeadRow(SQLModel, table=True):
    """The tip of one log: its size and Merkle frontier, locked by every append.

    Locking this row in the appending transaction is what keeps the order of a log total
    across worker processes.
    """

    __tablename__ = "audit_heads"

    id: str = Field(primary_key=True, max_length=64)
    tenant_id: str = Field(index=True, max_length=64)
    size: int = 0
    frontier: bytes = Field(default=b"", sa_column=Column(LargeBinary, nullable=False))
    last_leaf: bytes | None = Field(default=None, sa_column=Column(LargeBinary(32)))
    checkpoint_size: int = 0
    checkpoint_at: datetime = Field(sa_type=UTCDateTime)


class AuditCheckpointRow(SQLModel, table=True):
    """A signed checkpoint (C2SP signed note) of one log; all are kept."""

    __tablename__ = "audit_checkpoints"
    __table_args__ = (UniqueConstraint("tenant_id", "size", name="uq_audit_checkpoints_log_size"),)

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    size: int
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    note: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime)


class AuditNodeRow(SQLModel, table=True):
    """A perfect subtree root of height >= 8 (256 leaves), written when the append completes it.

    With these, a proof or a frontier reads O(log n) nodes plus at most two 256-leaf blocks
    instead of every leaf of the log.
    """

    __tablename__ = "audit_nodes"
    __table_args__ = (
        UniqueConstraint("tenant_id", "level", "idx", name="uq_audit_nodes_log_level_idx"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    level: int
    idx: int
    hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class AuditCosignatureRow(SQLModel, table=True):
    """A witness's cosignature line (C2SP cosignature/v1) on one stored checkpoint.

    Kept beside the checkpoint rather than in its note, so the note stays exactly what the
    service signed.  Not trusted: auditors verify each line under the witness keys they hold.
    """

    __tablename__ = "audit_cosignatures"
    __table_args__ = (
        UniqueConstraint("tenant_id", "size", "witness", name="uq_audit_cosignatures_log_size_w"),
    )

    id: int | None = Field(default=None, primary_key=True)
    tenant_id: str = Field(index=True, max_length=64)
    size: int
    witness: str = Field(max_length=200)
    line: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime)


class AuditPendingRow(SQLModel, table=True):
    """An append intent: a record committed with its caller's change, not yet in the log.

    Inserting one takes no lock on the log's head, so a tenant's callers on every node commit
    in parallel; a short sequencing transaction, holding the head once for a whole batch, moves
    the intents of a log into ``audit_entries`` in ``id`` order and deletes them.  An intent is
    durable from the caller's commit on: whoever next holds the head (any node) sequences it.
    """

    __tablename__ = "audit_pending"

    # 64-bit: ids are never reused and a busy service would exhaust 2^31 in days.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True,
                         autoincrement=True),
    )
    tenant_id: str = Field(index=True, max_length=64)
    event: str = Field(max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)
    #: The entry line after ``"time":…,`` (:func:`sandboxsec.audit.entry.encode_tail`).
    tail: str = Field(sa_column=Column(Text, nullable=False))
