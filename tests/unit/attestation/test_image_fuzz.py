"""Hostile bytes against the manifest parsers: always a reason code, never another exception."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.image import parse_statement, verify_manifest
from sandboxsec.attestation.image_errors import CertificateChainError, ImageError
from sandboxsec.errors import SandboxSecError
from tests.support.pki import (
    NOW,
    make_publisher,
    sample_reference,
    sign_raw,
    statement_dict,
)

_PUB = make_publisher()
_TRUST = _PUB.trust()
_VALID = sign_raw(json.dumps(statement_dict()).encode(), _PUB.leaf, _PUB.chain)
_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def _outcome(data: bytes) -> str:
    try:
        verify_manifest(data, _TRUST, NOW)
    except SandboxSecError as exc:
        assert (
            isinstance(exc, ImageError | CertificateChainError)
            or exc.reason == "image_manifest_too_large"
        )
        return exc.reason
    return "ok"


def test_the_seed_is_valid() -> None:
    assert _outcome(_VALID) == "ok"


@_FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    assert _outcome(data) != "ok"


@_FUZZ
@given(_json)
def test_random_json_documents(doc: Any) -> None:
    assert _outcome(json.dumps(doc).encode()) != "ok"


@_FUZZ
@given(st.data())
def test_mutated_valid_envelope(data: st.DataObject) -> None:
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del raw[pos : pos + data.draw(st.integers(1, 16))]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del raw[pos:]
    outcome = _outcome(bytes(raw))
    if outcome == "ok":
        # Only changes outside the signed bytes may survive: JSON whitespace, the keyid hint,
        # or base64 padding.  Whatever survived must still say exactly what was signed.
        result = verify_manifest(bytes(raw), _TRUST, NOW)
        assert result.reference == sample_reference()
        assert result.image_digest == "sha256:" + "ab" * 32


@_FUZZ
@given(st.data())
def test_mutated_fields_of_a_signed_statement(data: st.DataObject) -> None:
    # Sign arbitrary statement variants, so the fuzzing reaches the statement parser.
    doc: dict[str, Any] = statement_dict()
    path = data.draw(
        st.sampled_from(
            [
                ("_type",),
                ("subject",),
                ("predicateType",),
                ("predicate", "version"),
                ("predicate", "expires_at"),
                ("predicate", "issued_at"),
                ("predicate", "pcrs"),
                ("predicate", "event_digests"),
                ("predicate", "pcrs", "sha256"),
                ("predicate", "pcrs", "sha256", "0"),
            ]
        )
    )
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(_json)
    envelope = sign_raw(json.dumps(doc).encode(), _PUB.leaf, _PUB.chain)
    outcome = _outcome(envelope)
    assert outcome in {
        "ok",
        "image_statement_invalid",
        "image_manifest_expired",
        "image_manifest_not_yet_valid",
    }


@_FUZZ
@given(st.binary(max_size=3000))
def test_statement_parser_on_random_bytes(data: bytes) -> None:
    with pytest.raises(ImageError):
        parse_statement(data)


@_FUZZ
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3), st.binary(max_size=80))
def test_random_certificates_and_signatures(certs: list[bytes], sig: bytes) -> None:
    doc = json.loads(_VALID)
    doc["signatures"][0]["certificates"] = [base64.b64encode(c).decode() for c in certs]
    doc["signatures"][0]["sig"] = base64.b64encode(sig).decode()
    assert _outcome(json.dumps(doc).encode()) != "ok"
