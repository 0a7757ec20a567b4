"""What the trajectory service hands out: frozen views, never ORM rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["RecordView", "StoredRecord"]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """What a write returns: the new record's id and its clear metadata."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str
    created_at: datetime
    layout: str


@dataclass(frozen=True, slots=True)
class RecordView:
    """A decrypted record."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str
    created_at: datetime
    created_by: str
    meta: dict[str, Any]
    data: bytes
