"""The witness's decision procedure (c2sp.org/tlog-witness) on a real state file."""

from __future__ import annotations

import base64
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint
from sandboxsec.audit.cosignature import WitnessKey, verify_cosignatures
from sandboxsec.audit.errors import (
    WitnessForkError,
    WitnessOriginUnknownError,
    WitnessProofInvalidError,
    WitnessRequestMalformedError,
    WitnessSignatureUntrustedError,
    WitnessSizeConflictError,
)
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.witness import (
    EMPTY_ROOT,
    FileWitnessStore,
    TrustedLog,
    Witness,
)

LOG_KEY = Ed25519PrivateKey.generate()
KEY_NAME = "audit.example"
ORIGIN = f"{KEY_NAME}/tn_1"
LEAVES = [bytes([i]) * 32 for i in range(40)]
TREE = MerkleTree(LEAVES)


def note(size: int, root: bytes | None = None, origin: str = ORIGIN,
         key: Ed25519PrivateKey = LOG_KEY) -> str:
    cp = Checkpoint(origin, size, TREE.root(size) if root is None else root)
    return sign_checkpoint(cp, name=KEY_NAME, private_key=key).note


def body(old: int, new_note: str, proof: list[bytes] | None = None) -> bytes:
    if proof is None:
        proof = TREE.consistency_proof(old, int(new_note.split("\n")[1])) if old else []
    lines = "".join(base64.b64encode(h).decode() + "\n" for h in proof)
    return f"old {old}\n{lines}\n{new_note}".encode()


@pytest.fixture
def witness(tmp_path: Path) -> Witness:
    return Witness(
        name="w.example/1",
        private_key=Ed25519PrivateKey.generate(),
        logs=[TrustedLog(KEY_NAME, LOG_KEY.public_key(), KEY_NAME + "/")],
        store=FileWitnessStore(tmp_path / "w" / "state.json"),
        now=lambda: 1_800_000_000,
    )


def _cosigned(w: Witness, line: str, size: int) -> bool:
    cp = Checkpoint(ORIGIN, size, TREE.root(size))
    return bool(verify_cosignatures(cp, [line], [w.key]))


def test_first_checkpoint_then_consistent_extensions_are_cosigned(
    witness: Witness, tmp_path: Path
) -> None:
    assert _cosigned(witness, witness.add_checkpoint(body(0, note(10))), 10)
    assert _cosigned(witness, witness.add_checkpoint(body(10, note(17))), 17)
    # Resubmitting the same tree gets a fresh cosignature (timestamps stay current).
    assert _cosigned(witness, witness.add_checkpoint(body(17, note(17), [])), 17)
    state = tmp_path / "w" / "state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # The state keeps the log-signed checkpoint as evidence.
    held = FileWitnessStore(state).get(ORIGIN)
    assert held is not None and held.note == note(17)


def test_a_stale_old_size_gets_409_with_the_held_size(witness: Witness) -> None:
    witness.add_checkpoint(body(0, note(10)))
    with pytest.raises(WitnessSizeConflictError) as err:
        witness.add_checkpoint(body(0, note(20)))
    assert err.value.size == 10 and err.value.status == 409


def test_rollback_is_refused(witness: Witness) -> None:
    witness.add_checkpoint(body(0, note(20)))
    with pytest.raises(WitnessRequestMalformedError):  # old above new: 400
        witness.add_checkpoint(body(20, note(10), []))
    with pytest.raises(WitnessSizeConflictError):  # claims a smaller old size: 409
        witness.add_checkpoint(body(5, note(10)))


def test_a_fork_is_refused(witness: Witness) -> None:
    witness.add_checkpoint(body(0, note(20)))
    other = MerkleTree([b"\xee" * 32, *LEAVES[1:]])
    # Same size, other root.
    with pytest.raises(WitnessForkError) as err:
        witness.add_checkpoint(body(20, note(20, other.root(20)), []))
    assert err.value.status == 409
    # A larger tree that rewrote the past: its proof cannot verify against what we hold.
    with pytest.raises(WitnessProofInvalidError) as err2:
        witness.add_checkpoint(body(20, note(30, other.root(30)), other.consistency_proof(20, 30)))
    assert err2.value.status == 422
    # The state did not move.
    assert _cosigned(witness, witness.add_checkpoint(body(20, note(30))), 30)


def test_an_empty_tree_with_a_wrong_root_gets_422(witness: Witness) -> None:
    with pytest.raises(WitnessProofInvalidError):
        witness.add_checkpoint(body(0, note(0, b"\x00" * 32), []))
    witness.add_checkpoint(body(0, note(0, EMPTY_ROOT), []))


def test_unknown_origins_and_untrusted_signatures(witness: Witness) -> None:
    with pytest.raises(WitnessOriginUnknownError) as err:
        witness.add_checkpoint(body(0, note(10, origin="other.example/tn_1")))
    assert err.value.status == 404
    # The prefix alone is not an origin.
    with pytest.raises(WitnessOriginUnknownError):
        witness.add_checkpoint(body(0, note(10, origin=KEY_NAME + "/")))
    with pytest.raises(WitnessSignatureUntrustedError) as err2:
        witness.add_checkpoint(body(0, note(10, key=Ed25519PrivateKey.generate())))
    assert err2.value.status == 403


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"old 0\n",  # no blank line, no checkpoint
        b"old 01\n\n" + note(10).encode(),  # leading zero
        b"old -1\n\n" + note(10).encode(),
        b"new 0\n\n" + note(10).encode(),
        b"old 0\nnot base64!\n\n" + note(10).encode(),
        b"old 0\n" + base64.b64encode(b"x" * 31) + b"\n\n" + note(10).encode(),
        b"old 5\n" + (base64.b64encode(b"x" * 32) + b"\n") * 64 + b"\n" + note(10).encode(),
        b"old 0\n\n" + note(10).replace("\n\n", "\next\n\n").encode(),  # extension line
        b"old 0\n\n" + note(10).encode().replace(b"\n", b"\r\n"),
        b"old 0\n\n\xff" + note(10).encode(),
        b"old 0\n\n" + b"x" * 70_000,
    ],
)
def test_malformed_requests_get_400(witness: Witness, raw: bytes) -> None:
    with pytest.raises(WitnessRequestMalformedError) as err:
        witness.add_checkpoint(raw)
    assert err.value.status == 400


def test_a_proof_from_zero_must_be_empty(witness: Witness) -> None:
    with pytest.raises(WitnessRequestMalformedError):
        witness.add_checkpoint(body(0, note(10), [b"\x00" * 32]))


class RecordingStore(FileWitnessStore):
    """Records, in commit order, each size written (decide runs under the file lock)."""

    written: list[int] = []

    def update(self, origin, decide):  # type: ignore[no-untyped-def]
        def wrapped(current):  # type: ignore[no-untyped-def]
            new = decide(current)
            RecordingStore.written.append(new.size)
            return new

        return super().update(origin, wrapped)


def test_concurrent_submissions_never_roll_back(tmp_path: Path) -> None:
    """Many threads, two witness objects on one state file (as two processes would be)."""
    store_path = tmp_path / "state.json"
    key = Ed25519PrivateKey.generate()
    RecordingStore.written = []
    witnesses = [
        Witness(name="w.example/1", private_key=key,
                logs=[TrustedLog(KEY_NAME, LOG_KEY.public_key(), KEY_NAME + "/")],
                store=RecordingStore(store_path), now=lambda: 1)
        for _ in range(2)
    ]
    witnesses[0].add_checkpoint(body(0, note(1)))
    cosigned: list[int] = []
    lock = threading.Lock()

    def submit(i: int) -> None:
        w = witnesses[i % 2]
        for new in range(2, 41):
            for old in (new - 1, new - 2, 1):
                if old < 1:
                    continue
                try:
                    w.add_checkpoint(body(old, note(new)))
                except (WitnessSizeConflictError, WitnessRequestMalformedError):
                    continue
                with lock:
                    cosigned.append(new)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cosigned
    # Whatever the interleaving, the held size only grew, and ends at the largest tree.
    assert RecordingStore.written == sorted(RecordingStore.written)
    held = FileWitnessStore(store_path).get(ORIGIN)
    assert held is not None and held.size == 40 and held.root_hash == TREE.root(40)
    with pytest.raises(WitnessSizeConflictError):
        witnesses[1].add_checkpoint(body(39, note(40)))


def test_witness_key_string_round_trips(witness: Witness) -> None:
    assert WitnessKey.from_private(witness.key.name, Ed25519PrivateKey.generate()).vkey()
    from sandboxsec.audit.cosignature import parse_witness_key

    assert parse_witness_key(witness.key.vkey()).key_id == witness.key.key_id
