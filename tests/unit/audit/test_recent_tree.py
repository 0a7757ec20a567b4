"""Witness consistency proofs from the leaves the writer committed equal the stored tree's, and
anything the kept run cannot place exactly is left to the stored tree (``None``)."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.merkle import Frontier, MerkleTree, verify_consistency
from sandboxsec.audit.recent_tree import RecentTrees


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + i.to_bytes(8, "big")).digest() for i in range(n)]


def _feed(recent: RecentTrees, log_id: str, leaves: list[bytes], start: int,
          batches: list[int]) -> int:
    """Commit ``leaves[start:]`` in transactions of the given sizes, as the writer does."""
    frontier = Frontier.from_leaves(leaves, start)
    at = start
    for b in batches:
        chunk = leaves[at : at + b]
        if not chunk:
            break
        before = frontier.to_bytes()
        frontier.extend(chunk)
        recent.committed(log_id, at, before, chunk, frontier.to_bytes())
        at += len(chunk)
    return at


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(0, 700),
    batches=st.lists(st.integers(1, 300), min_size=1, max_size=12),
    max_leaves=st.sampled_from([64, 512, 8192]),
    data=st.data(),
)
def test_every_proof_from_memory_equals_the_stored_tree_proof(
    start: int, batches: list[int], max_leaves: int, data: st.DataObject
) -> None:
    leaves = _leaves(start + sum(batches))
    tree = MerkleTree(leaves)
    recent = RecentTrees(max_leaves=max_leaves)
    end = _feed(recent, "tn_a", leaves, start, batches)
    boundaries = [start]
    for b in batches:
        boundaries.append(boundaries[-1] + b)
    answered = 0
    pairs = [(old, new) for old in boundaries for new in boundaries if old <= new]
    pairs += [(data.draw(st.integers(0, end)), end) for _ in range(20)]
    for old, new in pairs:
        got = recent.consistency_proof("tn_a", old, new)
        if got is None:
            continue
        answered += 1
        assert got == tree.consistency_proof(old, new), (old, new)
        assert verify_consistency(old, new, tree.root(old), tree.root(new), got)
    # Every transaction boundary (where checkpoints are) among the newest max_leaves / 2
    # leaves is answered from memory, to any later boundary.
    recent_marks = [m for m in boundaries if m and m >= end - max_leaves // 2]
    for old in recent_marks:
        for new in recent_marks:
            if new >= old:
                assert recent.consistency_proof("tn_a", old, new) is not None, (old, new)
    assert answered or start == 0 or end == start


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.integers(1, 5), min_size=1, max_size=40),
       max_leaves=st.integers(4, 24))
def test_small_transactions_cut_often_keep_every_recent_boundary(
    batches: list[int], max_leaves: int
) -> None:
    leaves = _leaves(sum(batches))
    tree = MerkleTree(leaves)
    recent = RecentTrees(max_leaves=max_leaves)
    end = _feed(recent, "tn_a", leaves, 0, batches)
    marks = [sum(batches[:i]) for i in range(1, len(batches) + 1)]
    for old in [m for m in marks if m >= end - max_leaves // 2]:
        for new in [m for m in marks if m >= old]:
            assert recent.consistency_proof("tn_a", old, new) == tree.consistency_proof(
                old, new), (old, new)


def test_a_size_before_the_kept_run_is_left_to_the_store() -> None:
    leaves = _leaves(3000)
    recent = RecentTrees(max_leaves=1024)
    _feed(recent, "tn_a", leaves, 0, [1000, 1000, 1000])
    assert recent.consistency_proof("tn_a", 1000, 3000) is None  # cut away
    assert recent.consistency_proof("tn_a", 2000, 3000) == MerkleTree(leaves).consistency_proof(
        2000, 3000)
    assert recent.consistency_proof("tn_a", 2000, 3001) is None  # beyond what committed
    assert recent.consistency_proof("tn_b", 2000, 3000) is None  # another log
    assert recent.consistency_proof("tn_a", 0, 3000) is None  # nothing to prove: not asked


def test_a_commit_elsewhere_restarts_the_run_at_the_new_head() -> None:
    leaves = _leaves(2500)
    tree = MerkleTree(leaves)
    recent = RecentTrees()
    _feed(recent, "tn_a", leaves, 0, [1000])
    # Entries 1000..1499 were committed by another process: this one never saw them.
    _feed(recent, "tn_a", leaves, 1500, [1000])
    assert recent.consistency_proof("tn_a", 1000, 2500) is None
    assert recent.consistency_proof("tn_a", 1500, 2500) == tree.consistency_proof(1500, 2500)


def test_a_run_is_never_continued_from_another_tree_of_the_same_size() -> None:
    # A transaction rolled back after this process built on it, and another writer committed
    # different entries at the same positions: same start size, another frontier.
    mine = _leaves(2000, b"mine")
    theirs = mine[:1000] + _leaves(1000, b"theirs")
    after = _leaves(500, b"after")
    recent = RecentTrees()
    _feed(recent, "tn_a", mine, 0, [1000, 1000])  # the second batch "committed" here only
    real = theirs + after
    _feed(recent, "tn_a", real, 2000, [500])
    tree = MerkleTree(real)
    assert recent.consistency_proof("tn_a", 1000, 2500) is None
    assert recent.consistency_proof("tn_a", 2000, 2500) == tree.consistency_proof(2000, 2500)


def test_a_malformed_start_frontier_keeps_nothing() -> None:
    recent = RecentTrees()
    leaves = _leaves(10)
    good = Frontier.from_leaves(leaves)
    recent.committed("tn_a", 7, b"\x00" * 32, leaves[7:], good.to_bytes())
    assert recent.consistency_proof("tn_a", 7, 10) is None
    _feed(recent, "tn_a", leaves, 0, [4])
    recent.committed("tn_a", 4, Frontier.from_leaves(leaves, 4).to_bytes(), leaves[4:], b"")
    assert recent.consistency_proof("tn_a", 2, 4) is None  # the whole run was dropped


def test_the_number_of_logs_kept_is_bounded() -> None:
    recent = RecentTrees(max_logs=2)
    leaves = _leaves(600)
    for log_id in ("tn_a", "tn_b", "tn_c"):
        _feed(recent, log_id, leaves, 0, [300, 300])
    assert recent.consistency_proof("tn_a", 300, 600) is None
    assert recent.consistency_proof("tn_c", 300, 600) == MerkleTree(leaves).consistency_proof(
        300, 600)
