"""The reading side of the audit log: checkpoints, entries, exports and proofs.

Everything here reads what :class:`~sandboxsec.audit.writer.AuditWriter` stored; the only
write it causes is signing a fresh checkpoint before an export or proof, through the
:class:`Checkpointer` it is given, so the newest entries are covered by a signature.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from sqlalchemy import select, tuple_

from sandboxsec.audit.config import AuditConfig
from sandboxsec.audit.cosignature_store import stored_cosignatures
from sandboxsec.audit.entry import hmac_value
from sandboxsec.audit.errors import AuditRangeError, AuditUnavailableError
from sandboxsec.audit.export import ConsistencyRecord, ExportHeader, render_export
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.merkle import Frontier, ProofError, ProofSource, perfect_root
from sandboxsec.audit.store import (
    ENTRIES,
    HEADS,
    NODE_MIN_HEIGHT,
    NODES,
    ReadConn,
    StoredCheckpoint,
    load_checkpoints,
)
from sandboxsec.storage.db import Database

__all__ = ["AuditReader", "Checkpointer", "StoredTree"]

#: Entries read per query while streaming an export.
_EXPORT_CHUNK = 5000


class Checkpointer(Protocol):
    """Signs a checkpoint over a log's newest entries (the writer does)."""

    def checkpoint_now(self, log_id: str) -> StoredCheckpoint:
        """The latest checkpoint, signing one first if entries were added since the last."""
        ...


@runtime_checkable
class Sequencer(Protocol):
    """Moves a log's committed append intents into the log (the writer does)."""

    def sequence(self, log_id: str) -> None:
        """Sequence the committed intents of ``log_id`` now."""
        ...


class AuditReader:
    """Reads the logs of one service: checkpoints, entries, exports, inclusion and consistency."""

    def __init__(self, db: Database, keys: AuditKeys, config: AuditConfig,
                 checkpoints: Checkpointer) -> None:
        self._db = db
        self._keys = keys
        self._config = config
        self._checkpoints = checkpoints
        # Reads first sequence the intents committed so far, so they see every acknowledged
        # record; the writer is both, when it is one.
        self._sequencer: Sequencer | None = (
            checkpoints if isinstance(checkpoints, Sequencer) else None)

    def _sequence(self, log_id: str) -> None:
        if self._sequencer is not None:
            self._sequencer.sequence(log_id)

    def origin(self, log_id: str) -> str:
        """The checkpoint origin line of a log: ``<audit_origin>/<log id>``."""
        return self._config.origin_of(log_id)

    def checkpoints(self, log_id: str) -> list[StoredCheckpoint]:
        """Every stored checkpoint of a log, smallest first."""
        return load_checkpoints(self._db, log_id)

    def latest_checkpoint(self, log_id: str) -> StoredCheckpoint | None:
        """The newest stored checkpoint of a log, if any."""
        rows = load_checkpoints(self._db, log_id, newest_only=True)
        return rows[0] if rows else None

    def tree(self, log_id: str, size: int) -> StoredTree:
        """Proof building over the stored nodes and leaf hashes of the first ``size`` entries."""
        return StoredTree(self._db, log_id, size)

    def entry_lines(self, log_id: str, start: int, end: int) -> Iterator[bytes]:
        """The stored canonical lines of entries ``start <= seq < end``, in order, in chunks."""
        lo = start
        while lo < end:
            hi = min(end, lo + _EXPORT_CHUNK)
            q = (
                select(ENTRIES.c.seq, ENTRIES.c.entry)
                .where(ENTRIES.c.tenant_id == log_id, ENTRIES.c.seq >= lo, ENTRIES.c.seq < hi)
                .order_by(ENTRIES.c.seq)
            )
            with ReadConn(self._db) as conn:
                rows = conn.execute(q).all()
            for r in rows:
                yield r[1].encode("ascii") if isinstance(r[1], str) else bytes(r[1])
            lo = hi

    def entries(
        self, log_id: str, *, event: str | None = None, start: int = 0, end: int | None = None
    ) -> list[dict[str, Any]]:
        """Parsed entries of a log (optionally one event type), oldest first."""
        self._sequence(log_id)
        q = select(ENTRIES.c.entry).where(ENTRIES.c.tenant_id == log_id, ENTRIES.c.seq >= start)
        if end is not None:
            q = q.where(ENTRIES.c.seq < end)
        if event is not None:
            q = q.where(ENTRIES.c.event == str(event))
        with ReadConn(self._db) as conn:
            rows = conn.execute(q.order_by(ENTRIES.c.seq)).all()
        return [json.loads(r[0]) for r in rows]

    def hash_value(self, log_id: str, value: Any) -> str:
        """The HMAC a sensitive ``value`` would have in ``log_id`` (for an auditor to match)."""
        return hmac_value(self._keys.hmac_key(log_id), value)

    def size(self, log_id: str) -> int:
        """The number of entries of a log."""
        self._sequence(log_id)
        with ReadConn(self._db) as conn:
            row = conn.execute(select(HEADS.c.size).where(HEADS.c.id == log_id)).first()
        return int(row[0]) if row else 0

    def export(
        self, log_id: str, *, start: int = 0, end: int | None = None, since: int | None = None
    ) -> Iterator[bytes]:
        """The export file of entries ``start <= seq < end`` as a stream of lines.

        A fresh checkpoint is signed first, so the newest entries are covered.  ``end`` is
        moved up to the next checkpoint size so every exported entry is under a signature.
        ``since`` is a tree size the auditor already holds a checkpoint for; the export then
        carries a consistency proof from it.  Range errors are raised before the first line.
        """
        latest = self._checkpoints.checkpoint_now(log_id)
        if end is None:
            end = latest.size
        if start < 0 or end < start or end > latest.size:
            raise AuditRangeError(f"the range {start}..{end} is outside 0..{latest.size}")
        if since is not None and not 0 <= since <= latest.size:
            raise AuditRangeError(f"no tree of size {since} in a log of {latest.size} entries")
        stored = load_checkpoints(self._db, log_id)
        sizes = [c.size for c in stored]
        end = min(s for s in sizes if s >= end)
        # Checkpoints covering the range, and the newest one before it (continuity).
        chosen = [c for c in stored if start <= c.size <= end]
        before = [c for c in stored if c.size < start]
        if before:
            chosen.insert(0, before[-1])
        tree = self.tree(log_id, end)
        proofs: list[ConsistencyRecord] = []
        pairs = list(zip([c.size for c in chosen], [c.size for c in chosen][1:], strict=False))
        if since is not None and chosen:
            target = next((c.size for c in chosen if c.size >= since), None)
            if target is not None and since not in [c.size for c in chosen]:
                pairs.append((since, target))
        for a, b in pairs:
            try:
                proofs.append(ConsistencyRecord(a, b, tree.consistency_proof(a, b)))
            except ProofError:
                # Stored rows are missing (tampered); the verifier names the gap.
                continue
        try:
            frontier = tree.frontier(start).hashes or []
        except ProofError:
            frontier = []
        header = ExportHeader(
            log_id=log_id,
            origin=self._config.origin_of(log_id),
            key_name=self._keys.key_name,
            start=start,
            end=end,
            frontier=frontier,
            prev_leaf=tree.leaf(start - 1) if start > 0 else None,
        )
        cosigs = self.cosignatures(log_id)
        return render_export(
            header, [c.note for c in chosen], proofs, self.entry_lines(log_id, start, end),
            cosignatures=[cosigs.get(c.size, []) for c in chosen],
        )

    def cosignatures(self, log_id: str, size: int | None = None) -> dict[int, list[str]]:
        """Stored witness cosignature lines by checkpoint size (not verified here)."""
        return stored_cosignatures(self._db, log_id, size)

    def inclusion(self, log_id: str, seq: int, size: int | None = None) -> dict[str, Any]:
        """A self-contained proof that entry ``seq`` is in a signed checkpoint.

        ``size`` picks a stored checkpoint (default: the newest, signed now if needed).
        """
        cp = (self._checkpoints.checkpoint_now(log_id) if size is None
              else self._checkpoint_at(log_id, size))
        if not 0 <= seq < cp.size:
            raise AuditRangeError(f"entry {seq} is not in the checkpoint of size {cp.size}")
        try:
            proof = self.tree(log_id, cp.size).inclusion_proof(seq)
        except ProofError as exc:
            raise AuditUnavailableError("the stored log is incomplete") from exc
        line = next(self.entry_lines(log_id, seq, seq + 1), b"")
        return {
            "log_id": log_id,
            "seq": seq,
            "entry": line.decode("ascii"),
            "tree_size": cp.size,
            "checkpoint": cp.note,
            "proof": [base64.b64encode(h).decode() for h in proof],
        }

    def consistency(self, log_id: str, first: int, second: int) -> dict[str, Any]:
        """A consistency proof between two stored checkpoints, with both signed notes."""
        a = self._checkpoint_at(log_id, first)
        b = self._checkpoint_at(log_id, second)
        if a.size > b.size:
            raise AuditRangeError("the first checkpoint must not be larger than the second")
        try:
            proof = self.tree(log_id, b.size).consistency_proof(a.size)
        except ProofError as exc:
            raise AuditUnavailableError("the stored log is incomplete") from exc
        return {
            "log_id": log_id,
            "first": a.size,
            "second": b.size,
            "first_checkpoint": a.note,
            "second_checkpoint": b.note,
            "proof": [base64.b64encode(h).decode() for h in proof],
        }

    def _checkpoint_at(self, log_id: str, size: int) -> StoredCheckpoint:
        for c in load_checkpoints(self._db, log_id, up_to=size):
            if c.size == size:
                return c
        raise AuditRangeError(f"no checkpoint of size {size}")


class _NodeRecorder(ProofSource):
    """Runs a proof algorithm on placeholder hashes to list the stored nodes it reads."""

    _PLACEHOLDER = bytes(32)

    def __init__(self, size: int) -> None:
        self.size = size
        self.wanted: set[tuple[int, int]] = set()

    def perfect(self, level: int, index: int) -> bytes:
        if level >= NODE_MIN_HEIGHT:
            self.wanted.add((level, index))
        return self._PLACEHOLDER


class StoredTree(ProofSource):
    """RFC 9162 proofs from the database: stored nodes, and leaf hashes read in 256-blocks.

    Perfect subtrees of height >= ``NODE_MIN_HEIGHT`` come from ``audit_nodes`` (loaded once,
    about n/128 rows); smaller ones are hashed from an aligned block of leaf hashes, so any
    proof reads at most a few blocks whatever the size of the log.  Missing rows (a damaged or
    tampered store) raise :class:`ProofError`.
    """

    _BLOCK = 1 << NODE_MIN_HEIGHT

    def __init__(self, db: Database, log_id: str, size: int) -> None:
        self.size = size
        self._db = db
        self._id = log_id
        self._blocks: dict[int, list[bytes]] = {}
        self._nodes: dict[tuple[int, int], bytes] = {}

    # Each proof first runs on a recorder to learn which stored nodes it needs, then reads
    # just those in one query: O(log n) rows per proof, where reading every node of the log
    # (n/128 rows) made each checkpoint's witness proofs cost more as the log grew.
    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves."""
        self._prefetch(lambda src: ProofSource.root(src, size))
        return super().root(size)

    def frontier(self, size: int | None = None) -> Frontier:
        """The compact form of the first ``size`` leaves."""
        self._prefetch(lambda src: ProofSource.frontier(src, size))
        return super().frontier(size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PATH(index, D[0:size])`` from the stored nodes and leaves."""
        self._prefetch(lambda src: ProofSource.inclusion_proof(src, index, size))
        return super().inclusion_proof(index, size)

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 9162 ``PROOF(first, D[0:second])`` from the stored nodes and leaves."""
        self._prefetch(lambda src: ProofSource.consistency_proof(src, first, second))
        return super().consistency_proof(first, second)

    def _prefetch(self, run: Callable[[ProofSource], object]) -> None:
        recorder = _NodeRecorder(self.size)
        try:
            run(recorder)
        except ProofError:
            return  # the real run raises the same error
        want = [k for k in recorder.wanted if k not in self._nodes]
        if want:
            self._load_nodes(want)

    def _load_nodes(self, keys: Sequence[tuple[int, int]]) -> None:
        q = select(NODES.c.level, NODES.c.idx, NODES.c.hash).where(
            NODES.c.tenant_id == self._id,
            tuple_(NODES.c.level, NODES.c.idx).in_([tuple(k) for k in keys]),
        )
        with ReadConn(self._db) as conn:
            rows = conn.execute(q).all()
        self._nodes.update(
            {(lv, ix): bytes(h) for lv, ix, h in rows if (ix + 1) << lv <= self.size}
        )

    def perfect(self, level: int, index: int) -> bytes:
        lo = index << level
        if lo + (1 << level) > self.size:
            raise ProofError(f"subtree {index} at height {level} is beyond size {self.size}")
        if level >= NODE_MIN_HEIGHT:
            node = self._nodes.get((level, index))
            if node is None:
                self._load_nodes([(level, index)])
                node = self._nodes.get((level, index))
            if node is None:
                raise ProofError(f"the stored node {index} at height {level} is missing")
            return node
        block = self._block(lo // self._BLOCK)
        off = lo % self._BLOCK
        part = block[off : off + (1 << level)]
        if len(part) != 1 << level:
            raise ProofError(f"stored leaves {lo}..{lo + (1 << level) - 1} are missing")
        return perfect_root(part)

    def leaf(self, seq: int) -> bytes | None:
        """The stored leaf hash of entry ``seq`` (None when missing)."""
        block = self._block(seq // self._BLOCK)
        off = seq % self._BLOCK
        return block[off] if off < len(block) else None

    def _block(self, b: int) -> list[bytes]:
        cached = self._blocks.get(b)
        if cached is not None:
            return cached
        lo, hi = b * self._BLOCK, min(self.size, (b + 1) * self._BLOCK)
        q = (
            select(ENTRIES.c.seq, ENTRIES.c.leaf_hash)
            .where(ENTRIES.c.tenant_id == self._id, ENTRIES.c.seq >= lo, ENTRIES.c.seq < hi)
            .order_by(ENTRIES.c.seq)
        )
        with ReadConn(self._db) as conn:
            rows = conn.execute(q).all()
        # Keep only a gap-free run from the block start: a gap means rows were removed.
        leaves: list[bytes] = []
        for seq, h in rows:
            if seq != lo + len(leaves):
                break
            leaves.append(bytes(h))
        if len(self._blocks) >= 64:
            self._blocks.clear()
        self._blocks[b] = leaves
        return leaves
