"""RFC 9162 (Certificate Transparency v2) Merkle tree hashing, proofs and their verification.

Pure functions over hashes: nothing here reads a database, a file or the clock.

* ``leaf_hash(entry) = SHA-256(0x00 || entry)`` and ``node_hash(l, r) = SHA-256(0x01 || l || r)``
  keep leaves and inner nodes in separate domains (RFC 9162 section 2.1.1).
* :class:`Frontier` is the compact form of a tree: the roots of its perfect subtrees, largest
  first.  Appending a leaf costs amortised one node hash and at most ``log2(n)`` hashes, so the
  service never recomputes the whole tree.
* ``inclusion_proof`` / ``consistency_proof`` build RFC 9162 ``PATH`` and ``SUBPROOF`` from the
  stored leaf hashes; ``verify_inclusion`` / ``verify_consistency`` check them with the
  algorithms of sections 2.1.3.2 and 2.1.4.2 and never trust the prover's word.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "MerkleTree",
    "ProofError",
    "ProofSource",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "perfect_root",
    "root_from_leaves",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
#: The root of the empty tree: SHA-256 of the empty string (RFC 9162 section 2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF = b"\x00"
_NODE = b"\x01"
_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof request or a proof is structurally impossible (wrong sizes, wrong lengths)."""


def leaf_hash(entry: bytes) -> bytes:
    """``SHA-256(0x00 || entry)``."""
    return _sha256(_LEAF + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``."""
    return _sha256(_NODE + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (``n >= 2``): RFC 9162's ``k``."""
    return 1 << ((n - 1).bit_length() - 1)


def _reduce(level: Sequence[bytes]) -> list[bytes]:
    """One level up: hash neighbours pairwise (an odd last node is left for the caller)."""
    it = iter(level)
    seeded = _sha256(_NODE)  # copied per node, never updated itself
    out: list[bytes] = []
    append = out.append
    # zip(it, it) walks the list two at a time without index arithmetic: the hot loop of
    # tree building and of export verification.  Copying a hash object that has already
    # absorbed the 0x01 prefix is cheaper than setting up a new one for every node.
    for a, b in zip(it, it, strict=False):
        h = seeded.copy()
        h.update(a + b)
        append(h.digest())
    return out


def _subtree_root(leaves: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for ``hi > lo``, computed level by level (no recursion per leaf)."""
    level = list(leaves[lo:hi])
    while len(level) > 1:
        nxt = _reduce(level)
        if len(level) % 2:
            # An odd node is promoted unchanged; for RFC 9162 trees this reproduces the
            # left-balanced shape because the left part is always a perfect subtree.
            nxt.append(level[-1])
        level = nxt
    return level[0]


def root_from_leaves(leaves: Sequence[bytes], size: int | None = None) -> bytes:
    """The root of the tree over the first ``size`` leaf hashes (all when ``size`` is None)."""
    n = len(leaves) if size is None else size
    if n < 0 or n > len(leaves):
        raise ProofError(f"tree size {n} outside 0..{len(leaves)}")
    if n == 0:
        return EMPTY_ROOT
    return _subtree_root(leaves, 0, n)


@dataclass(slots=True)
class Frontier:
    """The compact form of a tree: perfect-subtree roots, largest first, and the leaf count.

    Mutable on purpose (it is the incremental builder); ``copy()`` before sharing.  The stored
    form (``to_bytes``) is the concatenated hashes, which together with ``size`` is all the
    service keeps per log to append in O(log n).
    """

    size: int = 0
    hashes: list[bytes] | None = None

    def __post_init__(self) -> None:
        if self.hashes is None:
            self.hashes = []
        # The number of perfect subtrees is the number of one bits in the size.
        if len(self.hashes) != bin(self.size).count("1"):
            raise ProofError(
                f"frontier of size {self.size} needs {bin(self.size).count('1')} hashes, "
                f"got {len(self.hashes)}"
            )

    def copy(self) -> Frontier:
        """An independent copy."""
        return Frontier(self.size, list(self._h))

    @property
    def _h(self) -> list[bytes]:
        assert self.hashes is not None  # set in __post_init__
        return self.hashes

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash; merges equal-height subtrees as a binary counter carries."""
        h = leaf
        hashes = self._h
        s = self.size
        while s & 1:
            h = _sha256(_NODE + hashes.pop() + h).digest()
            s >>= 1
        hashes.append(h)
        self.size += 1

    def append_recording(
        self, leaf: bytes, out: list[tuple[int, int, bytes]], min_height: int
    ) -> None:
        """``append``, also collecting every completed subtree of height >= ``min_height``.

        Each item is ``(height, index, hash)``: the perfect subtree over leaves
        ``[index * 2**height, (index + 1) * 2**height)``.  Storing these lets proofs be built
        without reading every leaf (see :class:`SubtreeSource`).
        """
        h = leaf
        hashes = self._h
        s = self.size
        height = 0
        while s & 1:
            h = _sha256(_NODE + hashes.pop() + h).digest()
            s >>= 1
            height += 1
            if height >= min_height:
                out.append((height, self.size >> height, h))
        hashes.append(h)
        self.size += 1

    def extend(
        self,
        leaves: Sequence[bytes],
        blocks: Mapping[int, bytes] | None = None,
        block_height: int = 0,
        root_of: Callable[[int, int], bytes] | None = None,
    ) -> None:
        """Append many leaf hashes in order, a whole perfect subtree at a time.

        Same result as ``append`` per leaf, but aligned blocks are reduced level by level in
        tight loops, which roughly halves the cost per leaf.  ``blocks`` may hold roots of
        the aligned perfect subtrees of height ``block_height`` already computed over these
        same leaves (by block index in the whole tree): a subtree made of such blocks is
        reduced from their roots instead of from its leaves.  ``root_of(i, k)``, when given,
        returns the root of ``leaves[i : i + 2**k]`` in place of reducing them here (a bulk
        hasher's answer for the same RFC 9162 subtree).
        """
        i, n = 0, len(leaves)
        while i < n:
            k = (n - i).bit_length() - 1
            if self.size:
                # The block must start at a multiple of its width to be a subtree of the tree.
                k = min(k, (self.size & -self.size).bit_length() - 1)
            width = 1 << k
            root = None
            if blocks and block_height and k >= block_height:
                first = self.size >> block_height
                parts = [blocks.get(first + j) for j in range(width >> block_height)]
                if None not in parts:
                    root = _subtree_root(parts, 0, len(parts))  # type: ignore[arg-type]
            if root is None:
                root = root_of(i, k) if root_of else _subtree_root(leaves, i, i + width)
            self._push(root, k)
            i += width

    def _push(self, h: bytes, height: int) -> None:
        hashes = self._h
        s = self.size >> height
        while s & 1:
            h = _sha256(_NODE + hashes.pop() + h).digest()
            s >>= 1
        hashes.append(h)
        self.size += 1 << height

    def root(self) -> bytes:
        """The tree root at the current size."""
        hashes = self._h
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = _sha256(_NODE + h + r).digest()
        return r

    def to_bytes(self) -> bytes:
        """The concatenated subtree hashes (the size is stored beside it)."""
        return b"".join(self._h)

    @classmethod
    def from_bytes(cls, size: int, blob: bytes) -> Frontier:
        """Rebuild from ``size`` and ``to_bytes()`` output."""
        if len(blob) % HASH_SIZE:
            raise ProofError("frontier blob is not a whole number of hashes")
        hashes = [blob[i : i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
        return cls(size, hashes)

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes], size: int | None = None) -> Frontier:
        """The frontier of the tree over the first ``size`` leaf hashes."""
        n = len(leaves) if size is None else size
        if n < 0 or n > len(leaves):
            raise ProofError(f"tree size {n} outside 0..{len(leaves)}")
        return MerkleTree(leaves).frontier(n)


class ProofSource:
    """Builds roots, frontiers and RFC 9162 proofs from perfect-subtree hashes.

    Subclasses answer ``perfect(level, index)``: the root of the aligned perfect subtree over
    leaves ``[index * 2**level, (index + 1) * 2**level)``.  Every range an RFC 9162 proof
    needs splits into such subtrees, so the same algorithms serve an in-memory tree
    (:class:`MerkleTree`) and the service's stored nodes.
    """

    size: int

    def perfect(self, level: int, index: int) -> bytes:
        raise NotImplementedError

    def _hash(self, lo: int, hi: int) -> bytes:
        # RFC 9162 ranges start aligned to the power of two at or above their width, so the
        # left part is always a perfect subtree.
        width = hi - lo
        if width & (width - 1) == 0:
            level = width.bit_length() - 1
            return self.perfect(level, lo >> level)
        k = _largest_power_of_two_below(width)
        return _sha256(_NODE + self._hash(lo, lo + k) + self._hash(lo + k, hi)).digest()

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves."""
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ProofError(f"tree size {n} outside 0..{self.size}")
        return EMPTY_ROOT if n == 0 else self._hash(0, n)

    def frontier(self, size: int | None = None) -> Frontier:
        """The compact form of the first ``size`` leaves."""
        n = self.size if size is None else size
        if not 0 <= n <= self.size:
            raise ProofError(f"tree size {n} outside 0..{self.size}")
        hashes: list[bytes] = []
        lo = 0
        for bit in range(n.bit_length() - 1, -1, -1):
            if n & (1 << bit):
                hashes.append(self.perfect(bit, lo >> bit))
                lo += 1 << bit
        return Frontier(n, hashes)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 ``PATH(index, D[0:size])``: the audit path of one leaf, leaf level first."""
        n = self.size if size is None else size
        if not 0 <= index < n <= self.size:
            raise ProofError(f"leaf {index} is not in a tree of size {n}")
        proof: list[bytes] = []
        lo, hi, m = 0, n, index
        # Walk down from the root; siblings are collected root first, then reversed.
        while hi - lo > 1:
            k = _largest_power_of_two_below(hi - lo)
            if m < k:
                proof.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._hash(lo, lo + k))
                lo, m = lo + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, first: int, second: int | None = None) -> list[bytes]:
        """RFC 9162 ``PROOF(first, D[0:second])``: the first tree is a prefix of the second."""
        n = self.size if second is None else second
        if not 0 <= first <= n <= self.size:
            raise ProofError(f"no consistency proof from size {first} to size {n}")
        if first == 0 or first == n:
            return []
        proof: list[bytes] = []
        lo, hi, m, whole = 0, n, first, True
        # SUBPROOF(m, D[lo:hi], whole), unrolled; nodes collected root first, then reversed.
        while True:
            if m == hi - lo:
                if not whole:
                    proof.append(self._hash(lo, hi))
                break
            k = _largest_power_of_two_below(hi - lo)
            if m <= k:
                proof.append(self._hash(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._hash(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        proof.reverse()
        return proof


class MerkleTree(ProofSource):
    """A read-only tree over leaf hashes held in memory.

    Every perfect, aligned subtree hash is computed once (about ``n`` node hashes in all), so
    any root, frontier or proof afterwards costs O(log n) lookups.
    """

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self.size = len(leaves)
        levels: list[list[bytes]] = [list(leaves)]
        while len(levels[-1]) > 1:
            levels.append(_reduce(levels[-1]))
        self._levels = levels

    def perfect(self, level: int, index: int) -> bytes:
        try:
            return self._levels[level][index]
        except IndexError as exc:
            raise ProofError(f"no subtree {index} at height {level}") from exc


def perfect_root(leaves: Sequence[bytes]) -> bytes:
    """The root of a perfect subtree given all its leaf hashes (length a power of two)."""
    n = len(leaves)
    if n == 0 or n & (n - 1):
        raise ProofError("a perfect subtree has a power-of-two number of leaves")
    return _subtree_root(leaves, 0, n)


def inclusion_proof(index: int, leaves: Sequence[bytes], size: int | None = None) -> list[bytes]:
    """RFC 9162 ``PATH(index, D[0:size])`` over a list of leaf hashes."""
    return MerkleTree(leaves).inclusion_proof(index, size)


def consistency_proof(
    first: int, leaves: Sequence[bytes], second: int | None = None
) -> list[bytes]:
    """RFC 9162 ``PROOF(first, D[0:second])`` over a list of leaf hashes."""
    return MerkleTree(leaves).consistency_proof(first, second)


def _check_hashes(proof: Sequence[bytes]) -> None:
    for h in proof:
        if len(h) != HASH_SIZE:
            raise ProofError("proof contains a value that is not a SHA-256 hash")


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` place ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size or len(leaf) != HASH_SIZE:
        return False
    _check_hashes(proof)
    fn, sn = index, size - 1
    r = leaf
    for p in proof:
        if sn == 0:
            return False  # proof longer than the path
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                # Right edge of a non-perfect subtree: skip the levels where we have no sibling.
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree ``(first, first_root)`` a prefix of the second?"""
    if not 0 <= first <= second:
        return False
    _check_hashes(proof)
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        # Every tree extends the empty tree; a proof for it must be empty.
        return not proof
    path = list(proof)
    # 1. When the first tree is a perfect left subtree its root is the implicit first node.
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    if not path:
        return False
    fn, sn = first - 1, second - 1
    # 2. Shift both indices right while fn's lowest bit is set (shared complete subtrees).
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0
