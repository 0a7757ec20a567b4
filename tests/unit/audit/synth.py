"""Builds audit logs and exports in memory with the same pure code the service uses."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint
from sandboxsec.audit.entry import encode_entry
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.export import ConsistencyRecord, ExportHeader, render_export
from sandboxsec.audit.merkle import Frontier, MerkleTree
from sandboxsec.audit.record import AuditRecord

KEY_NAME = "audit.example"
LOG = "tn_test"
ORIGIN = f"{KEY_NAME}/{LOG}"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def record(i: int) -> AuditRecord:
    return AuditRecord(
        event=AuditEvent.POLICY_DECISION,
        tenant_id=LOG,
        actor_key_id="ak_1",
        actor_role="agent",
        outcome="allow" if i % 3 else "deny",
        reason="rule_1",
        object_ids={"session_id": f"ss_{i}"},
        body={"i": i, "action": "payment"},
        sensitive={"token": f"secret-{i}"},
    )


@dataclass
class SynthLog:
    """A log of ``n`` entries with a checkpoint every ``every`` entries and at the end."""

    n: int
    every: int = 10
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    lines: list[bytes] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        f = Frontier()
        prev = None
        for i in range(self.n):
            e = encode_entry(record(i), log_id=LOG, seq=i, prev=prev, now=NOW, hmac_key=b"k" * 32)
            self.lines.append(e.line)
            f.append(e.leaf_hash)
            prev = e.leaf_hash
            if f.size % self.every == 0 or f.size == self.n:
                self.notes[f.size] = self.sign(f.size, f.root())

    def sign(self, size: int, root: bytes, key: Ed25519PrivateKey | None = None) -> str:
        cp = Checkpoint(ORIGIN, size, root)
        return sign_checkpoint(cp, name=KEY_NAME, private_key=key or self.key).note

    @property
    def leaves(self) -> list[bytes]:
        import hashlib

        return [hashlib.sha256(b"\x00" + ln).digest() for ln in self.lines]

    def export(
        self,
        start: int = 0,
        end: int | None = None,
        *,
        lines: list[bytes] | None = None,
        notes: list[str] | None = None,
        extra_proofs: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> bytes:
        end = self.n if end is None else end
        tree = MerkleTree(self.leaves)
        chosen = sorted(s for s in self.notes if start <= s <= end)
        before = [s for s in self.notes if s < start]
        if before:
            chosen.insert(0, max(before))
        pairs = list(itertools.pairwise(chosen)) + list(extra_proofs)
        proofs = [ConsistencyRecord(a, b, tree.consistency_proof(a, b)) for a, b in pairs]
        header = ExportHeader(
            log_id=LOG,
            origin=ORIGIN,
            key_name=KEY_NAME,
            start=start,
            end=end,
            frontier=tree.frontier(start).hashes or [],
            prev_leaf=self.leaves[start - 1] if start else None,
        )
        body_lines = self.lines[start:end] if lines is None else lines
        note_list = [self.notes[s] for s in chosen] if notes is None else notes
        return b"".join(render_export(header, note_list, proofs, body_lines))
