"""``sandboxsec witness serve`` over HTTP: the tlog-witness status codes and content types,
its state surviving a restart, and its files' modes."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint, verifier_key
from sandboxsec.audit.cosignature import parse_witness_key, signature_lines, verify_cosignatures
from sandboxsec.audit.merkle import MerkleTree
from tests.integration.audit.witnesses import start_witness, stop_witness

KEY = Ed25519PrivateKey.generate()
NAME = "log.example/audit"
ORIGIN = f"{NAME}/tn_http"
TREE = MerkleTree([bytes([i]) * 32 for i in range(30)])


def _note(size: int, root: bytes | None = None, key: Ed25519PrivateKey = KEY) -> str:
    cp = Checkpoint(ORIGIN, size, TREE.root(size) if root is None else root)
    return sign_checkpoint(cp, name=NAME, private_key=key).note


def _body(old: int, note: str, proof: list[bytes] | None = None) -> bytes:
    size = int(note.split("\n")[1])
    if proof is None:
        proof = TREE.consistency_proof(old, size) if 0 < old < size else []
    return (f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof)
            + "\n" + note).encode()


def test_status_codes_content_types_and_restart(tmp_path: Path) -> None:
    home = tmp_path / "w"
    w = start_witness(home, "w.example/http", verifier_key(NAME, KEY.public_key()))
    try:
        post = lambda body: httpx.post(w.url, content=body, timeout=30)  # noqa: E731
        r = post(_body(0, _note(10)))
        assert r.status_code == 200
        cp = Checkpoint(ORIGIN, 10, TREE.root(10))
        assert verify_cosignatures(cp, signature_lines(r.text), [parse_witness_key(w.vkey)])
        # Stale old size: 409 with the held size as text/x.tlog.size.
        r = post(_body(0, _note(20)))
        assert r.status_code == 409
        assert r.headers["content-type"].startswith("text/x.tlog.size")
        assert r.text == "10\n"
        # A fork at the held size: 409, not a size.
        r = post(_body(10, _note(10, b"\x07" * 32), []))
        assert r.status_code == 409 and not r.headers["content-type"].startswith("text/x.tlog")
        # A proof that does not verify: 422.
        r = post(_body(10, _note(20), [b"\x00" * 32] * 3))
        assert r.status_code == 422
        assert post(b"old 0\n").status_code == 400
        assert post(_body(0, _note(10, key=Ed25519PrivateKey.generate()))).status_code == 403
        other = sign_checkpoint(Checkpoint("elsewhere.example/x", 1, b"\x01" * 32), name=NAME,
                                private_key=KEY).note
        assert post(_body(0, other)).status_code == 404
        assert httpx.get(w.url.rsplit("/", 1)[0] + "/nothing").status_code == 404
        big = httpx.post(w.url, content=b"x" * 70_000, timeout=30)
        assert big.status_code == 400
    finally:
        stop_witness(w)
    # Restarted on the same home: the same key, the same state (no rollback by restart).
    w2 = start_witness(home, "w.example/http", verifier_key(NAME, KEY.public_key()))
    try:
        assert w2.vkey == w.vkey
        r = httpx.post(w2.url, content=_body(0, _note(5)), timeout=30)
        assert r.status_code == 409 and r.text == "10\n"
        assert httpx.post(w2.url, content=_body(10, _note(25)), timeout=30).status_code == 200
    finally:
        stop_witness(w2)
    for name in ("witness_key.pem", "witness_state.json"):
        assert stat.S_IMODE((home / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
