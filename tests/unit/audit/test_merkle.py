"""RFC 9162 hashing, the incremental frontier and proofs, against a naive recomputation."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.merkle import (
    EMPTY_ROOT,
    Frontier,
    MerkleTree,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)
from sandboxsec.audit.verify import _chunk


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def naive_mth(leaves: list[bytes]) -> bytes:
    """MTH exactly as RFC 9162 section 2.1.1 defines it, recursively."""
    n = len(leaves)
    if n == 0:
        return _sha(b"")
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return _sha(b"\x01" + naive_mth(leaves[:k]) + naive_mth(leaves[k:]))


def naive_path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if m < k:
        return [*naive_path(m, leaves[:k]), naive_mth(leaves[k:])]
    return [*naive_path(m - k, leaves[k:]), naive_mth(leaves[:k])]


def naive_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [naive_mth(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return [*naive_subproof(m, leaves[:k], b), naive_mth(leaves[k:])]
    return [*naive_subproof(m - k, leaves[k:], False), naive_mth(leaves[:k])]


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


# The certificate-transparency reference vectors (8 leaves and the root at each size).
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_reference_vectors_for_every_size() -> None:
    hashes = [leaf_hash(x) for x in CT_LEAVES]
    f = Frontier()
    for size, expected in enumerate(CT_ROOTS, start=1):
        f.append(hashes[size - 1])
        assert f.root().hex() == expected
        assert root_from_leaves(hashes, size).hex() == expected


def test_domain_separation_and_empty_tree() -> None:
    assert EMPTY_ROOT == _sha(b"")
    assert leaf_hash(b"x") == _sha(b"\x00x")
    assert node_hash(b"a" * 32, b"b" * 32) == _sha(b"\x01" + b"a" * 32 + b"b" * 32)
    assert Frontier().root() == EMPTY_ROOT
    assert MerkleTree([]).root() == EMPTY_ROOT


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=700).filter(lambda b: b"\n" not in b), min_size=1,
                max_size=40))
def test_in_place_leaf_hashes_are_the_rfc_leaf_hashes(entries: list[bytes]) -> None:
    # The verifier hashes each line in place by copying one seeded hash object: every digest
    # must still be exactly SHA-256(0x00 || line), whatever the bytes (NUL, empty lines), and
    # a second call must not see anything left over from the first.
    expected = [_sha(b"\x00" + e) for e in entries]
    for lines, want in ((entries, expected), (entries[::-1], expected[::-1])):
        data = b"\n".join(lines)
        assert _chunk(data, 0, len(data), b"", 0, b"")[0] == want


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=0, max_value=300))
def test_frontier_append_extend_and_tree_agree_with_naive(a: int, b: int) -> None:
    leaves = _leaves(a + b)
    one = Frontier()
    for h in leaves:
        one.append(h)
    two = Frontier()
    two.extend(leaves[:a])
    two.extend(leaves[a:])
    assert one.root() == two.root() == naive_mth(leaves) == MerkleTree(leaves).root()
    assert one.hashes == two.hashes
    # The stored form round-trips, and a frontier rebuilt from the leaves is the same.
    assert Frontier.from_bytes(one.size, one.to_bytes()).root() == one.root()
    assert Frontier.from_leaves(leaves, a).root() == naive_mth(leaves[:a])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_inclusion_proofs_match_naive_and_verify(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=1, max_value=200))
    m = data.draw(st.integers(min_value=0, max_value=n - 1))
    leaves = _leaves(n)
    root = naive_mth(leaves)
    proof = inclusion_proof(m, leaves)
    assert proof == naive_path(m, leaves)
    assert verify_inclusion(m, n, leaves[m], proof, root)
    # Negative: another leaf, another index, a flipped proof node, a short or long proof.
    other = (m + 1) % n
    if other != m:
        assert not verify_inclusion(m, n, leaves[other], proof, root)
        assert not verify_inclusion(other, n, leaves[m], proof, root)
    if proof:
        bad = list(proof)
        i = data.draw(st.integers(min_value=0, max_value=len(bad) - 1))
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        assert not verify_inclusion(m, n, leaves[m], bad, root)
        assert not verify_inclusion(m, n, leaves[m], proof[:-1], root)
    assert not verify_inclusion(m, n, leaves[m], [*proof, root], root)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_consistency_proofs_match_naive_and_verify(data: st.DataObject) -> None:
    n = data.draw(st.integers(min_value=1, max_value=200))
    m = data.draw(st.integers(min_value=1, max_value=n))
    leaves = _leaves(n)
    r1, r2 = naive_mth(leaves[:m]), naive_mth(leaves)
    proof = consistency_proof(m, leaves)
    assert proof == ([] if m == n else naive_subproof(m, leaves, True))
    assert verify_consistency(m, n, r1, r2, proof)
    # Negative: a different old root (a fork), a different new root, a flipped node.
    forked = naive_mth([*leaves[: m - 1], leaf_hash(b"forged")])
    assert not verify_consistency(m, n, forked, r2, proof)
    if m < n:
        assert not verify_consistency(m, n, r1, naive_mth([*leaves[:-1], leaf_hash(b"x")]), proof)
        i = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([bad[i][0] ^ 1]) + bad[i][1:]
        assert not verify_consistency(m, n, r1, r2, bad)
        assert not verify_consistency(m, n, r1, r2, [])


def test_consistency_edge_cases() -> None:
    leaves = _leaves(5)
    r = naive_mth(leaves)
    assert verify_consistency(5, 5, r, r, [])
    assert not verify_consistency(5, 5, r, EMPTY_ROOT, [])
    assert verify_consistency(0, 5, EMPTY_ROOT, r, [])
    assert not verify_consistency(0, 5, EMPTY_ROOT, r, [r])
    assert not verify_consistency(6, 5, r, r, [])


def test_proof_requests_outside_the_tree_are_refused() -> None:
    tree = MerkleTree(_leaves(4))
    with pytest.raises(ProofError):
        tree.inclusion_proof(4)
    with pytest.raises(ProofError):
        tree.consistency_proof(3, 5)
    with pytest.raises(ProofError):
        tree.root(5)
    with pytest.raises(ProofError):
        Frontier(3, [b"\x00" * 32])
    with pytest.raises(ProofError):
        verify_inclusion(0, 1, b"\x00" * 32, [b"short"], b"\x00" * 32)


def test_proofs_are_logarithmic() -> None:
    tree = MerkleTree(_leaves(1 << 12))
    assert len(tree.inclusion_proof(1234)) == 12
    assert len(tree.consistency_proof(1000, 4096)) <= 2 * 12


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=600), st.integers(min_value=0, max_value=4))
def test_recorded_subtrees_are_the_trees_perfect_nodes(n: int, min_height: int) -> None:
    leaves = _leaves(n)
    f = Frontier()
    nodes: list[tuple[int, int, bytes]] = []
    for h in leaves:
        f.append_recording(h, nodes, min_height)
    tree = MerkleTree(leaves)
    expected = {
        (lv, ix) for lv in range(max(1, min_height), n.bit_length()) for ix in range(n >> lv)
    }
    assert {(lv, ix) for lv, ix, _ in nodes} == expected
    assert all(tree.perfect(lv, ix) == h for lv, ix, h in nodes)
    assert f.root() == tree.root()
