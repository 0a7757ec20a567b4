"""Authenticated trajectory order: each record's place in its session and its author.

Every record written since this format carries a per-session sequence number ``seq`` (0, 1,
2, … with no gaps) and its author (the API key id that wrote it).  Both are sealed, with the
writer's metadata, inside the record's ``meta_sealed`` ciphertext, whose associated data
already binds tenant, session, record id and kind; the row also holds them in clear
(``seq``, ``created_by``) for ordering and lookup.  A reader compares the two:

* sealed seq differs from the row's: the row was moved (``trajectory_record_reordered``);
* sealed author differs from ``created_by``: the record was re-attributed
  (``trajectory_record_reattributed``);
* the session's seq values are not exactly 0..n-1 up to the newest one read, or fewer than
  the session's head says were written: a record was removed (``trajectory_record_missing``).

Sealed layout (canonical JSON, sealed with context part ``meta.v2``)::

    {"author": "<key id>", "meta": {...writer's meta...}, "seq": <n>}

This module is pure: values in, values or a typed error out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
)

__all__ = [
    "META_PART_V1",
    "META_PART_V2",
    "SeqRange",
    "check_head",
    "check_range",
    "open_meta",
    "seal_meta",
]

#: Context part of records without authenticated order (seq NULL).
META_PART_V1 = "meta"
#: Context part of records whose sealed metadata carries seq and author.
META_PART_V2 = "meta.v2"


def seal_meta(meta: Mapping[str, Any], *, seq: int, author: str) -> bytes:
    """The plaintext sealed as a record's metadata: the writer's meta, its seq and author."""
    doc = {"author": author, "meta": dict(meta), "seq": seq}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def open_meta(raw: bytes, *, seq: int, author: str) -> dict[str, Any]:
    """Check decrypted metadata against the row's clear ``seq`` and ``created_by``.

    1. the plaintext is the sealed layout (else ``decryption_failed``: it was not ours);
    2. the sealed seq equals the row's (else ``trajectory_record_reordered``);
    3. the sealed author equals the row's (else ``trajectory_record_reattributed``).
    Returns the writer's metadata.
    """
    try:
        doc = json.loads(raw)
        sealed_seq, sealed_author, meta = doc["seq"], doc["author"], doc["meta"]
    except (ValueError, KeyError, TypeError):
        raise DecryptionFailedError() from None
    if not isinstance(sealed_seq, int) or not isinstance(meta, dict):
        raise DecryptionFailedError()
    if sealed_seq != seq:
        raise TrajectoryRecordReorderedError(
            f"this record was written at position {sealed_seq} of its session but is stored "
            f"at position {seq}"
        )
    if sealed_author != author:
        raise TrajectoryRecordReattributedError(
            "this record's stored author is not the key that wrote it"
        )
    return meta


@dataclass(frozen=True, slots=True)
class SeqRange:
    """What the store holds for seq values 0..``upto`` of one session (one aggregate query)."""

    upto: int
    rows: int
    distinct: int
    lowest: int | None


def check_range(found: SeqRange) -> None:
    """Every position 0..upto is present exactly once (else ``trajectory_record_missing``;
    a duplicate position is ``trajectory_record_reordered``)."""
    if found.rows != found.distinct:
        raise TrajectoryRecordReorderedError("two records claim one position of the session")
    if found.lowest is not None and found.lowest < 0:
        raise TrajectoryRecordReorderedError("a record claims a position before the first")
    expected = found.upto + 1
    if found.rows < expected or (found.lowest is not None and found.lowest > 0):
        raise TrajectoryRecordMissingError(
            f"{expected - found.rows} record(s) of this session up to position {found.upto} "
            "are missing"
        )
    if found.rows > expected:
        raise TrajectoryRecordReorderedError("more records than positions: a record was moved")


def check_head(written: int, stored: int) -> None:
    """The session head says ``written`` records were written; ``stored`` remain."""
    if stored < written:
        raise TrajectoryRecordMissingError(
            f"{written - stored} record(s) at the end of this session are missing"
        )
    if stored > written:
        raise TrajectoryRecordReorderedError("more records than the session's head counts")
