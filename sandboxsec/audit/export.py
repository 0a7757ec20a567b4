"""The audit export file: JSON Lines that verify offline with nothing but the audit public key.

Layout (one JSON value per line, in this order)::

    {"type":"header","format":"sandboxsec-audit-export/1","log_id":..,"origin":..,
     "key_name":..,"from":F,"to":T,"frontier":[b64..],"prev_leaf":hex}
    {"type":"checkpoint","note":"<C2SP signed note>"}            one per checkpoint
      (+ "cosignatures":["— witness b64..\n", ..] when witnesses cosigned it)
    {"type":"consistency","first":A,"second":B,"proof":[b64..]}  one per consecutive pair
    {"v":1,"log":..,"seq":F,...}                                  entries F .. T-1, verbatim

``from`` is the first sequence number (inclusive), ``to`` the end (exclusive).  ``frontier`` is
the compact tree of the entries before ``from`` (empty when ``from`` is 0) and ``prev_leaf`` the
leaf hash of entry ``from - 1``; neither is trusted: a wrong value makes the recomputed roots
miss the signed checkpoints.  Entry lines are the exact canonical bytes that were hashed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "EXPORT_FORMAT",
    "ConsistencyRecord",
    "ExportHeader",
    "render_export",
]

EXPORT_FORMAT = "sandboxsec-audit-export/1"


@dataclass(frozen=True, slots=True)
class ExportHeader:
    """The first line of an export."""

    log_id: str
    origin: str
    key_name: str
    start: int
    end: int
    frontier: Sequence[bytes]
    prev_leaf: bytes | None

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": "header",
                "format": EXPORT_FORMAT,
                "log_id": self.log_id,
                "origin": self.origin,
                "key_name": self.key_name,
                "from": self.start,
                "to": self.end,
                "frontier": [base64.b64encode(h).decode() for h in self.frontier],
                "prev_leaf": self.prev_leaf.hex() if self.prev_leaf is not None else None,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class ConsistencyRecord:
    """A consistency proof from tree size ``first`` to tree size ``second``."""

    first: int
    second: int
    proof: Sequence[bytes]

    def to_json(self) -> str:
        return json.dumps(
            {
                "type": "consistency",
                "first": self.first,
                "second": self.second,
                "proof": [base64.b64encode(h).decode() for h in self.proof],
            },
            separators=(",", ":"),
        )


def render_export(
    header: ExportHeader,
    checkpoint_notes: Iterable[str],
    proofs: Iterable[ConsistencyRecord],
    entry_lines: Iterable[bytes],
    *,
    cosignatures: Sequence[Sequence[str]] = (),
) -> Iterator[bytes]:
    """Yield the export line by line (each ending in ``\\n``), streaming the entries.

    ``cosignatures[i]`` are the witness cosignature lines of the ``i``-th checkpoint; the
    ``cosignatures`` field is written only when there are some, so exports without witnesses
    stay byte for byte what they were.
    """
    yield header.to_json().encode() + b"\n"
    for i, note in enumerate(checkpoint_notes):
        rec: dict[str, object] = {"type": "checkpoint", "note": note}
        lines = cosignatures[i] if i < len(cosignatures) else ()
        if lines:
            rec["cosignatures"] = list(lines)
        yield json.dumps(rec, separators=(",", ":")).encode()
        yield b"\n"
    for proof in proofs:
        yield proof.to_json().encode() + b"\n"
    for line in entry_lines:
        yield line + b"\n"
