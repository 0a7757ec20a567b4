"""C2SP signed-note checkpoints, canonical entries and HMAC'd sensitive values."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.checkpoint import (
    Checkpoint,
    key_id,
    parse_signed_checkpoint,
    sign_checkpoint,
    verifier_key,
    verify_signed_checkpoint,
)
from sandboxsec.audit.entry import GENESIS_PREV, canonical_json, encode_entry, entry_prefix
from sandboxsec.audit.errors import AuditCheckpointInvalidError, AuditCheckpointSignatureError
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.keys import AuditKeys, derive_hmac_key, load_public_key
from sandboxsec.audit.merkle import leaf_hash
from sandboxsec.audit.record import AuditRecord

KEY = Ed25519PrivateKey.generate()
ROOT = hashlib.sha256(b"root").digest()


def _note(size: int = 7, key: Ed25519PrivateKey = KEY, name: str = "log.example") -> str:
    return sign_checkpoint(Checkpoint("log.example/tn_1", size, ROOT), name=name,
                           private_key=key).note


def test_checkpoint_note_layout_follows_c2sp() -> None:
    note = _note()
    body, sig_line = note.split("\n\n")
    assert body == f"log.example/tn_1\n7\n{base64.b64encode(ROOT).decode()}"
    assert sig_line.startswith("\u2014 log.example ") and sig_line.endswith("\n")
    raw = base64.b64decode(sig_line.split(" ")[2])
    pub = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    expected_id = hashlib.sha256(b"log.example\n\x01" + pub).digest()[:4]
    assert raw[:4] == expected_id == key_id("log.example", KEY.public_key())
    KEY.public_key().verify(raw[4:], (body + "\n").encode())


def test_checkpoint_round_trip_and_verifier_key() -> None:
    cp = verify_signed_checkpoint(_note(), KEY.public_key(), origin="log.example/tn_1")
    assert (cp.size, cp.root_hash) == (7, ROOT)
    for _ in range(20):  # base64 of a key often contains '+', the field separator
        key = Ed25519PrivateKey.generate().public_key()
        vkey = verifier_key("log.example", key)
        assert load_public_key(vkey.encode()).public_bytes(Encoding.Raw, PublicFormat.Raw) == (
            key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        )


def test_a_cosignature_by_another_key_is_ignored_not_trusted() -> None:
    note = _note()
    witness = sign_checkpoint(Checkpoint("log.example/tn_1", 7, ROOT), name="witness.example",
                              private_key=Ed25519PrivateKey.generate()).note
    both = note + witness.split("\n\n")[1]
    assert verify_signed_checkpoint(both, KEY.public_key()).size == 7
    only_witness = note.split("\n\n")[0] + "\n\n" + witness.split("\n\n")[1]
    with pytest.raises(AuditCheckpointSignatureError):
        verify_signed_checkpoint(only_witness, KEY.public_key())


@pytest.mark.parametrize("change", [("\n7\n", "\n8\n"), ("tn_1", "tn_2")])
def test_an_altered_checkpoint_fails_its_signature(change: tuple[str, str]) -> None:
    with pytest.raises(AuditCheckpointSignatureError):
        verify_signed_checkpoint(_note().replace(*change, 1), KEY.public_key())


def test_another_key_or_name_fails() -> None:
    with pytest.raises(AuditCheckpointSignatureError):
        verify_signed_checkpoint(_note(key=Ed25519PrivateKey.generate()), KEY.public_key())
    with pytest.raises(AuditCheckpointSignatureError):
        verify_signed_checkpoint(_note(), KEY.public_key(), name="other.example")
    with pytest.raises(AuditCheckpointInvalidError):
        verify_signed_checkpoint(_note(), KEY.public_key(), origin="log.example/tn_2")


@pytest.mark.parametrize(
    "note",
    [
        "",
        "origin\n7\n",
        "origin\n07\nAAAA\n\n\u2014 n AAAAAAAA\n",
        "origin\nx\nAAAA\n\n\u2014 n AAAAAAAA\n",
        f"origin\n7\n{base64.b64encode(b'short').decode()}\n\n\u2014 n AAAAAAAA\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n- n AAAAAAAA\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 n !!!\n",
        f"origin\n7\n{base64.b64encode(ROOT).decode()}\n\n\u2014 \ud800 AAAAAAAA\n",
    ],
)
def test_malformed_checkpoints_are_refused(note: str) -> None:
    with pytest.raises(AuditCheckpointInvalidError):
        parse_signed_checkpoint(note)


def _record(**kw: object) -> AuditRecord:
    base: dict[str, object] = dict(
        event=AuditEvent.GRANT_VERIFY, tenant_id="tn_1", actor_key_id="ak_1",
        actor_role="agent", outcome="allow", reason=None,
        object_ids={"grant_id": "gr_1"}, body={"b": [1, 2], "a": "\u00e9"},
        sensitive={"grant": "super-secret-token", "amount": 1234, "ok": True},
    )
    base.update(kw)
    return AuditRecord(**base)  # type: ignore[arg-type]


NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_entry_encoding_is_canonical_and_hashes_its_exact_bytes() -> None:
    e = encode_entry(_record(), log_id="tn_1", seq=0, prev=None, now=NOW, hmac_key=b"k" * 32)
    again = encode_entry(_record(body={"a": "\u00e9", "b": [1, 2]}), log_id="tn_1", seq=0,
                         prev=None, now=NOW, hmac_key=b"k" * 32)
    assert e.line == again.line  # key order of the body does not matter
    assert e.line.startswith(entry_prefix("tn_1") + b"0," + b'"prev":"' + GENESIS_PREV.encode())
    assert e.leaf_hash == leaf_hash(e.line)
    assert e.line.isascii() and b" " not in e.line
    parsed = json.loads(e.line)
    assert list(parsed)[:5] == ["v", "log", "seq", "prev", "time"]
    assert parsed["time"] == "2026-11-25T12:00:00Z"
    assert parsed["body"] == {"a": "\u00e9", "b": [1, 2]}


def test_sensitive_values_of_every_type_are_hmaced_never_clear() -> None:
    e = encode_entry(_record(), log_id="tn_1", seq=3, prev=b"\x01" * 32, now=NOW,
                     hmac_key=b"k" * 32)
    assert b"super-secret-token" not in e.line and b"1234" not in e.line
    macs = json.loads(e.line)["hmac"]
    assert set(macs) == {"grant", "amount", "ok"}
    assert all(v.startswith("hmac-sha256:") and len(v) == 12 + 64 for v in macs.values())
    # Another tenant's key gives unrelated MACs for the same value.
    k1, k2 = derive_hmac_key(b"s" * 32, "tn_1"), derive_hmac_key(b"s" * 32, "tn_2")
    assert k1 != k2
    other = encode_entry(_record(), log_id="tn_1", seq=3, prev=b"\x01" * 32, now=NOW,
                         hmac_key=k2)
    assert json.loads(other.line)["hmac"]["grant"] != macs["grant"]


def test_non_json_values_in_a_body_are_recorded_not_dropped() -> None:
    e = encode_entry(_record(body={"when": NOW, "raw": b"\x00\x01", "set": {2, 1}}),
                     log_id="tn_1", seq=0, prev=None, now=NOW, hmac_key=b"k" * 32)
    body = json.loads(e.line)["body"]
    assert body == {"when": "2026-11-25T12:00:00Z", "raw": "AAE=", "set": [1, 2]}
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    with pytest.raises(ValueError):
        canonical_json(float("nan"))
    odd = encode_entry(_record(body={"x": [float("nan")], "y": float("inf")}), log_id="tn_1",
                       seq=0, prev=None, now=NOW, hmac_key=b"k" * 32)
    assert json.loads(odd.line)["body"] == {"x": ["nan"], "y": "inf"}


def test_audit_keys_are_created_once_with_private_modes(tmp_path: object) -> None:
    from pathlib import Path

    home = Path(str(tmp_path))
    a, b = AuditKeys(home, "n"), AuditKeys(home, "n")
    assert a.public_pem() == b.public_pem()
    assert a.hmac_key("tn_1") == b.hmac_key("tn_1") != a.hmac_key("tn_2")
    for name in ("signing_key.pem", "hmac_secret"):
        assert (home / "audit" / name).stat().st_mode & 0o777 == 0o600


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_the_checkpoint_parser_refuses_garbage_with_its_own_error(note: str) -> None:
    try:
        verify_signed_checkpoint(note, KEY.public_key())
    except (AuditCheckpointInvalidError, AuditCheckpointSignatureError):
        pass
