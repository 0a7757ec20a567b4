"""Challenge nonces: authenticated, tenant-bound, expiring; single use is the store's job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.nonce import NONCE_BYTES, check_nonce, mint_nonce, nonce_expiry
from sandboxsec.attestation.verifier import NonceState

KEY = b"k" * 32
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=120)


def test_fresh_nonce() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    assert len(n) == NONCE_BYTES and nonce_expiry(n) == LATER
    assert check_nonce(KEY, "tn_a", n, NOW) is NonceState.FRESH
    assert mint_nonce(KEY, "tn_a", LATER) != n


def test_other_tenant_other_key_and_tampering_are_unknown() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    assert check_nonce(KEY, "tn_b", n, NOW) is NonceState.UNKNOWN
    assert check_nonce(b"j" * 32, "tn_a", n, NOW) is NonceState.UNKNOWN
    for i in range(NONCE_BYTES):
        flipped = bytearray(n)
        flipped[i] ^= 1
        assert check_nonce(KEY, "tn_a", bytes(flipped), NOW) is NonceState.UNKNOWN


def test_expired() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    assert check_nonce(KEY, "tn_a", n, LATER) is NonceState.EXPIRED


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_are_unknown(data: bytes) -> None:
    assert check_nonce(KEY, "tn_a", data, NOW) is NonceState.UNKNOWN
