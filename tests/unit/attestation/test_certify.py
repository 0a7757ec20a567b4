"""TPM2_Certify of the session key (pure): hostile structures, each refused with its code.

The certify of a real TPM (swtpm), other TPMs' AKs and software keys are tested in
tests/integration/sessions/test_bound_sessions.py.
"""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxsec.attestation import certify, quote
from sandboxsec.errors import SandboxSecError
from tests.support.softtpm import (
    SoftAk,
    marshal_certify,
    sign_quote,
    soft_session_key_public,
)

NONCE = b"\x01" * 40


def _key() -> bytes:
    n = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    return soft_session_key_public(n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big"))


def _check(public: bytes, attest: bytes, ak: SoftAk, signature: bytes | None = None) -> None:
    certify.verify_session_key(public, attest, signature or sign_quote(ak, attest),
                               ak=quote.parse_ak_public(ak.public), nonce=NONCE,
                               policy=quote.QuotePolicy())


def test_honest_certify_verifies_and_names_the_key() -> None:
    ak, public = SoftAk(), _key()
    key = certify.verify_session_key(public, marshal_certify(NONCE, public),
                                     sign_quote(ak, marshal_certify(NONCE, public)),
                                     ak=quote.parse_ak_public(ak.public), nonce=NONCE,
                                     policy=quote.QuotePolicy())
    assert key.jkt == certify.parse_session_key(public).jkt and len(key.jkt) == 43


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda a: a[:-1], "session_key_certify_malformed"),
    (lambda a: a + b"\x00", "session_key_certify_malformed"),
    (lambda a: a[:5], "session_key_certify_malformed"),
    (lambda a: b"", "session_key_certify_malformed"),
    (lambda a: a[:4] + struct.pack(">H", 0x8018) + a[6:], "session_key_certify_type_invalid"),
    (lambda a: struct.pack(">I", 0xFF544348) + a[4:], "session_key_certify_magic_invalid"),
    (lambda a: a[:6] + struct.pack(">H", 0xFFFF) + a[8:], "session_key_certify_malformed"),
])
def test_hostile_certify_structures(mutate: object, expected: str) -> None:
    ak, public = SoftAk(), _key()
    attest = mutate(marshal_certify(NONCE, public))  # type: ignore[operator]
    with pytest.raises(SandboxSecError) as refused:
        _check(public, attest, ak)
    assert refused.value.reason == expected


def test_nonce_name_and_signature() -> None:
    ak, public, other = SoftAk(), _key(), _key()
    with pytest.raises(SandboxSecError, match="nonce") as r1:
        _check(public, marshal_certify(b"\x02" * 40, public), ak)
    assert r1.value.reason == "session_key_certify_nonce_mismatch"
    with pytest.raises(SandboxSecError) as r2:
        _check(public, marshal_certify(NONCE, other), ak)
    assert r2.value.reason == "session_key_certify_name_mismatch"
    attest = marshal_certify(NONCE, public)
    with pytest.raises(SandboxSecError) as r3:
        _check(public, attest, ak, sign_quote(SoftAk(), attest))
    assert r3.value.reason == "session_key_certify_signature_invalid"
    with pytest.raises(SandboxSecError) as r4:
        _check(public, attest, ak, sign_quote(ak, attest, hash_alg="sha1"))
    assert r4.value.reason == "session_key_algorithm_refused"
    with pytest.raises(SandboxSecError) as r5:
        _check(public, attest, ak, b"\x00\x18")
    assert r5.value.reason == "session_key_certify_malformed"


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x05abcde", b"\xff" * 200])
def test_hostile_public_areas(data: bytes) -> None:
    with pytest.raises(SandboxSecError) as refused:
        certify.parse_session_key(data)
    assert refused.value.reason == "session_key_public_malformed"


def test_an_ak_is_not_a_session_key() -> None:
    """The AK itself is restricted: offered as session key it is refused by its attributes."""
    ak = SoftAk()
    with pytest.raises(SandboxSecError) as refused:
        certify.parse_session_key(ak.public)
    assert refused.value.reason == "session_key_attributes_invalid"
