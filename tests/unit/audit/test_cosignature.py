"""Signed notes and cosignature/v1 against vectors published by other implementations.

Sources of the known answers:
* golang.org/x/mod/sumdb/note (note.go doc and note_test.go): the PeterNeumann key pair and
  the signed note it produces (Ed25519 is deterministic, so our signature must be identical);
* c2sp.org/tlog-cosignature: the example checkpoint, its witness line (key id ``8d66cf3f``,
  time 1679315147) and the exact signed message;
* transparency-dev/formats note/note_cosigv1_test.go: the type-0x04 verifier key of
  ``remora.n621.de`` and a cosignature dated 1727964367.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.checkpoint import Checkpoint, key_id, verifier_key
from sandboxsec.audit.cosignature import (
    WitnessKey,
    cosign,
    cosigned_message,
    parse_cosignature_line,
    parse_witness_key,
    verify_cosignatures,
)
from sandboxsec.audit.errors import AuditCheckpointInvalidError, AuditCosignatureInvalidError
from sandboxsec.audit.keys import load_public_key

GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_SIG = (
    "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
)

C2SP_BODY = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
C2SP_WITNESS_LINE = (
    "\u2014 witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dl"
    "rDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n"
)
TD_COSIG_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
TD_COSIG_SIG = (
    "ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOworDcFi"
    "EBYJXORmnFBOBA=="
)


def _go_private() -> Ed25519PrivateKey:
    raw = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert raw[0] == 1
    return Ed25519PrivateKey.from_private_bytes(raw[1:])


def test_signed_note_key_id_and_signature_match_go_sumdb_note() -> None:
    key = _go_private()
    assert verifier_key("PeterNeumann", key.public_key()) == GO_VKEY
    assert key_id("PeterNeumann", load_public_key(GO_VKEY.encode())).hex() == "c74f20a3"
    # Same key, same text: Ed25519 is deterministic, so the note line is byte-identical.
    sig = key.sign(GO_TEXT.encode())
    assert base64.b64encode(key_id("PeterNeumann", key.public_key()) + sig).decode() == GO_SIG


def test_cosignature_key_id_matches_transparency_dev() -> None:
    w = parse_witness_key(TD_COSIG_VKEY)
    assert w.name == "remora.n621.de" and w.key_id.hex() == "da77ade7"
    assert w.vkey() == TD_COSIG_VKEY


def test_published_cosignature_lines_parse() -> None:
    name, kid, ts, sig = parse_cosignature_line(C2SP_WITNESS_LINE)
    assert (name, kid.hex(), ts, len(sig)) == ("witness.example.com/w1", "8d66cf3f", 1679315147, 64)
    _, kid2, ts2, _ = parse_cosignature_line(f"\u2014 remora.n621.de {TD_COSIG_SIG}\n")
    assert (kid2.hex(), ts2) == ("646846b9", 1727964367)


def test_signed_message_is_the_spec_example() -> None:
    assert cosigned_message(C2SP_BODY, 1679315147) == (
        b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
        b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )


def test_cosignature_of_the_go_key_verifies_and_binds_everything() -> None:
    key = _go_private()
    w = WitnessKey.from_private("witness.example.com/w1", key)
    cp = Checkpoint("example.com/behind-the-sofa", 20852163,
                    base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="))
    line = cosign(cp, name=w.name, private_key=key, timestamp=1679315147)
    # The Go key under type 0x04 has another key id than under 0x01 (domain separation).
    assert parse_cosignature_line(line)[1] == w.key_id != key_id(w.name, key.public_key())
    [c] = verify_cosignatures(cp, [line], [w])
    assert (c.witness, c.timestamp, c.size) == (w.name, 1679315147, 20852163)
    # Another root, size or origin: the claimed witness did not sign that.
    for other in (
        Checkpoint(cp.origin, cp.size, b"\x00" * 32),
        Checkpoint(cp.origin, cp.size + 1, cp.root_hash),
        Checkpoint("example.com/other", cp.size, cp.root_hash),
    ):
        with pytest.raises(AuditCosignatureInvalidError):
            verify_cosignatures(other, [line], [w])
    # A changed timestamp is not signed.
    name, kid, ts, sig = parse_cosignature_line(line)
    forged = f"\u2014 {name} " + base64.b64encode(
        kid + (ts + 1).to_bytes(8, "big") + sig).decode() + "\n"
    with pytest.raises(AuditCosignatureInvalidError):
        verify_cosignatures(cp, [forged], [w])
    # Dated after "now": refused when the verifier gives its time.
    with pytest.raises(AuditCosignatureInvalidError):
        verify_cosignatures(cp, [line], [w], not_after=1679315146)


def test_unknown_witnesses_and_the_logs_own_line_are_ignored_each_witness_counts_once() -> None:
    a, b = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    wa = WitnessKey.from_private("w.example/a", a)
    cp = Checkpoint("log.example/x", 3, b"\x01" * 32)
    la1 = cosign(cp, name="w.example/a", private_key=a, timestamp=10)
    la2 = cosign(cp, name="w.example/a", private_key=a, timestamp=11)
    lb = cosign(cp, name="w.example/b", private_key=b, timestamp=10)
    # Same name, another key: ignored (name and key id must both match).
    impostor = cosign(cp, name="w.example/a", private_key=b, timestamp=10)
    found = verify_cosignatures(cp, [la1, la2, lb, impostor, C2SP_WITNESS_LINE], [wa])
    assert [c.witness for c in found] == ["w.example/a"]
    assert verify_cosignatures(cp, [lb], [wa]) == []


@pytest.mark.parametrize(
    "vkey",
    [
        GO_VKEY,  # type 0x01: a log key, not a cosigner key
        "remora.n621.de+da77ade8+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",  # id mismatch
        "remora.n621.de+DA77ADE7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",  # upper-case id
        "remora n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",  # space in name
        "remora.n621.de+da77ade7",
        "remora.n621.de+da77ade7+!!!!",
        "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmt",  # short key
    ],
)
def test_bad_witness_keys_are_refused(vkey: str) -> None:
    with pytest.raises(ValueError):
        parse_witness_key(vkey)


def test_malformed_cosignature_lines_are_refused() -> None:
    cp = Checkpoint("log.example/x", 3, b"\x01" * 32)
    w = WitnessKey.from_private("w.example/a", Ed25519PrivateKey.generate())
    with pytest.raises(AuditCheckpointInvalidError):
        verify_cosignatures(cp, ["\u2014 w.example/a not-base64!\n"], [w])
    short = "\u2014 w.example/a " + base64.b64encode(w.key_id + b"\x00" * 20).decode() + "\n"
    with pytest.raises(AuditCosignatureInvalidError):
        verify_cosignatures(cp, [short], [w])
