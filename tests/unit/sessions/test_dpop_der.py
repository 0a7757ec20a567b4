"""The DER form the verifier builds from a raw ES256 signature is the one the library makes
from the two integers, for every shape of r and s (leading zero bytes, top bit set, zero),
and a proof whose r or s starts with a zero byte verifies."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from sandboxsec.sessions import dpop
from sandboxsec.sessions.dpop import _raw_to_der

EDGES = [b"\x00" * 32, b"\x00" * 31 + b"\x01", b"\x80" + b"\x00" * 31, b"\xff" * 32,
         b"\x00" + b"\x80" * 31, b"\x00\x00\x7f" + b"\x11" * 29, b"\x01" + b"\x00" * 31]


@pytest.mark.parametrize("r", EDGES)
@pytest.mark.parametrize("s", EDGES)
def test_edges_match_the_library(r: bytes, s: bytes) -> None:
    expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
    assert _raw_to_der(r + s) == expected


def test_random_values_match_the_library() -> None:
    for _ in range(2000):
        raw = secrets.token_bytes(64)
        if secrets.randbelow(4) == 0:  # often a leading zero byte in r or s
            i = secrets.choice((0, 32))
            raw = raw[:i] + b"\x00" + raw[i + 1:]
        expected = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                        int.from_bytes(raw[32:], "big"))
        assert _raw_to_der(raw) == expected


@pytest.mark.parametrize("half", ["r", "s"])
def test_a_proof_with_a_short_r_or_s_verifies(half: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    n = key.public_key().public_numbers()
    jwk = dpop.ec_jwk(n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big"))
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def signer(message: bytes) -> bytes:
        while True:  # about one signature in 256 has a leading zero byte in this half
            sig = dpop.der_to_raw(key.sign(message, ec.ECDSA(hashes.SHA256())))
            if (sig[:32] if half == "r" else sig[32:])[0] == 0:
                return sig

    proof = dpop.create_proof(signer, jwk, method="POST", url="https://x.test/v1/actions",
                              session_id="ses_1", body=b"{}", now=now)
    verified = dpop.verify_proof(proof, method="POST", url="https://x.test/v1/actions",
                                 body=b"{}", session_id="ses_1", jkt=dpop.jwk_thumbprint(jwk),
                                 now=now, max_age_seconds=60, skew_seconds=5)
    assert verified.session_id == "ses_1"
