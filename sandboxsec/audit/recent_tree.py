"""Consistency proofs for witnesses from the tree this process just committed, in memory.

Every checkpoint the service submits needs a consistency proof from the size each witness last
cosigned, which is nearly always the previous checkpoint, a few transactions back.  The writer
already holds everything such a proof is made of: the frontier it started each transaction
from (read from the log's locked head) and the leaf hashes it appended.  :class:`RecentTrees`
keeps those, per log, for the transactions that *committed*, so a proof costs some hashing of
the newest leaves instead of reading stored nodes and leaf blocks back from the database.

It only ever answers from what it can place exactly:

* a transaction is added only if it continues the kept run: same start size *and* the same
  start frontier bytes as the run's end (a commit by another process, a caller's own
  transaction or a rolled-back batch in between restarts the run at the new head);
* a node is served from a frontier recorded at a transaction boundary, or hashed from kept
  leaves entirely inside the run; anything else (a size before the run, a subtree straddling
  its start) returns ``None`` and the caller reads the stored tree as before.

Witnesses verify every proof they receive; a proof from here that did not match the stored tree
would be refused (and raise the witness-refused alarm), so equality with the stored-tree proof
is tested over many sizes.  Memory is bounded: at most ``max_leaves`` leaf hashes per log and
``max_logs`` logs (least recently extended dropped first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from sandboxsec.audit.merkle import HASH_SIZE, ProofError, ProofSource, root_from_leaves

__all__ = ["RecentTrees"]


def _frontier_nodes(size: int, blob: bytes) -> dict[tuple[int, int], bytes]:
    """The perfect subtrees a frontier (``Frontier.to_bytes`` of ``size``) consists of, by
    ``(height, index)``; largest first, as the frontier stores them."""
    if len(blob) != HASH_SIZE * size.bit_count():
        raise ProofError(f"a frontier of size {size} needs {size.bit_count()} hashes")
    nodes: dict[tuple[int, int], bytes] = {}
    lo, i = 0, 0
    for bit in range(size.bit_length() - 1, -1, -1):
        if size >> bit & 1:
            nodes[(bit, lo >> bit)] = blob[i : i + HASH_SIZE]
            lo += 1 << bit
            i += HASH_SIZE
    return nodes


class _Run(ProofSource):
    """One log's kept run: leaves ``[base, end)`` and the frontiers at its boundaries."""

    def __init__(self, base: int, frontier: bytes) -> None:
        self.base = base
        self.size = base  # ProofSource: the tree size proofs may reach
        #: The frontier at ``size``: what the next transaction must start from.
        self.end_frontier = frontier
        self.leaves: list[bytes] = []
        #: Perfect subtrees known exactly: boundary frontiers, and nodes hashed so far.
        self.nodes: dict[tuple[int, int], bytes] = _frontier_nodes(base, frontier)
        #: Boundary sizes (ascending), whose frontiers are all in ``nodes``: where the run
        #: can be cut.
        self.marks: list[int] = [base]

    def add(self, leaves: Sequence[bytes], frontier: bytes) -> None:
        size = self.size + len(leaves)
        self.nodes.update(_frontier_nodes(size, frontier))  # checked before anything moves
        self.leaves.extend(leaves)
        self.size = size
        self.end_frontier = frontier
        self.marks.append(size)

    def cut(self, keep: int) -> None:
        """Drop leaves so at most about ``keep`` remain, restarting at a recorded boundary.

        Kept: the nodes a proof from any size at or after the new start can need.  Those left
        of it are the new start's own frontier (for ``old >= base`` the frontier of ``old``
        shares its nodes left of ``base`` with the frontier of ``base``) and nodes straddling
        it (frontier nodes of later boundaries); everything at or after it stays too.
        """
        if self.size - self.base <= 2 * keep:
            return
        # The last mark is the run's end, so there is always one.
        base = next(s for s in self.marks if s >= self.size - keep)
        start = {(bit, (base >> bit + 1) << 1) for bit in range(base.bit_length())
                 if base >> bit & 1}
        self.nodes = {
            (lv, ix): h for (lv, ix), h in self.nodes.items()
            if (ix + 1) << lv > base or (lv, ix) in start
        }
        self.leaves = self.leaves[base - self.base :]
        self.base = base
        self.marks = [s for s in self.marks if s >= base]

    def perfect(self, level: int, index: int) -> bytes:
        node = self.nodes.get((level, index))
        if node is not None:
            return node
        lo = index << level
        hi = lo + (1 << level)
        if lo < self.base or hi > self.size:
            raise ProofError("the subtree is outside the leaves kept in memory")
        node = self.nodes[(level, index)] = root_from_leaves(
            self.leaves[lo - self.base : hi - self.base])
        return node


class RecentTrees:
    """The newest committed leaves of each log, for witness consistency proofs (module doc)."""

    def __init__(self, *, max_leaves: int = 4096, max_logs: int = 16) -> None:
        self._max_leaves = max_leaves
        self._max_logs = max_logs
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._lock = threading.Lock()

    def committed(
        self, log_id: str, start_size: int, start_frontier: bytes, leaves: Sequence[bytes],
        end_frontier: bytes,
    ) -> None:
        """Record a committed transaction of ``log_id``: it started from the head
        ``(start_size, start_frontier)`` and appended ``leaves``, ending at ``end_frontier``."""
        with self._lock:
            run = self._runs.get(log_id)
            if run is None or run.size != start_size or run.end_frontier != start_frontier:
                run = None
            try:
                if run is None:
                    run = self._runs[log_id] = _Run(start_size, start_frontier)
                run.add(leaves, end_frontier)
            except ProofError:  # not a frontier of that size: keep nothing of this log
                self._runs.pop(log_id, None)
                return
            self._runs.move_to_end(log_id)
            run.cut(self._max_leaves // 2)
            while len(self._runs) > self._max_logs:
                self._runs.popitem(last=False)

    def consistency_proof(self, log_id: str, old: int, new: int) -> list[bytes] | None:
        """RFC 9162 ``PROOF(old, D[0:new])`` of ``log_id`` from memory, or ``None`` when the
        kept run does not cover it (the caller then reads the stored tree)."""
        with self._lock:
            run = self._runs.get(log_id)
            if run is None or not 0 < old <= new <= run.size or old < run.base:
                return None
            try:
                return run.consistency_proof(old, new)
            except ProofError:
                return None

    def forget(self, log_id: str) -> None:
        """Drop what is kept of ``log_id``."""
        with self._lock:
            self._runs.pop(log_id, None)
