"""Challenge nonces: authenticated, tenant-bound (optionally AK-bound), expiring, 32 bytes;
single use is the store's job."""

from __future__ import annotations

import hashlib
import hmac
import struct
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.nonce import (
    MAX_QUALIFYING_DATA,
    NONCE_BYTES,
    check_nonce,
    mint_nonce,
    nonce_expiry,
)
from sandboxsec.attestation.verifier import NonceState

KEY = b"k" * 32
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(seconds=120)
AK = bytes.fromhex("000b") + hashlib.sha256(b"ak one").digest()
OTHER_AK = bytes.fromhex("000b") + hashlib.sha256(b"ak two").digest()


def test_fresh_nonce_fits_sha256_only_tpms() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    assert len(n) == NONCE_BYTES == MAX_QUALIFYING_DATA == 32
    assert nonce_expiry(n) == LATER
    assert check_nonce(KEY, "tn_a", n, NOW) is NonceState.FRESH
    # An unbound nonce may be answered by any AK of the tenant.
    assert check_nonce(KEY, "tn_a", n, NOW, ak_name=AK) is NonceState.FRESH
    assert mint_nonce(KEY, "tn_a", LATER) != n


def test_other_tenant_other_key_and_tampering_are_unknown() -> None:
    for ak in (None, AK):
        n = mint_nonce(KEY, "tn_a", LATER, ak_name=ak)
        assert check_nonce(KEY, "tn_b", n, NOW, ak_name=ak) is NonceState.UNKNOWN
        assert check_nonce(b"j" * 32, "tn_a", n, NOW, ak_name=ak) is NonceState.UNKNOWN
        for i in range(NONCE_BYTES):
            for bit in range(8):
                flipped = bytearray(n)
                flipped[i] ^= 1 << bit
                assert check_nonce(KEY, "tn_a", bytes(flipped), NOW,
                                   ak_name=ak) is NonceState.UNKNOWN


def test_ak_bound_nonce_is_for_that_ak_only() -> None:
    n = mint_nonce(KEY, "tn_a", LATER, ak_name=AK)
    assert len(n) == 32
    assert check_nonce(KEY, "tn_a", n, NOW, ak_name=AK) is NonceState.FRESH
    assert check_nonce(KEY, "tn_a", n, NOW, ak_name=OTHER_AK) is NonceState.UNKNOWN
    # No AK (an unparsable AK public area) cannot answer an AK-bound nonce.
    assert check_nonce(KEY, "tn_a", n, NOW) is NonceState.UNKNOWN
    assert check_nonce(KEY, "tn_a", n, NOW, ak_name=b"") is NonceState.UNKNOWN
    # Turning a bound nonce into an unbound one (the kind byte) breaks the MAC.
    assert check_nonce(KEY, "tn_a", bytes([2]) + n[1:], NOW, ak_name=AK) is NonceState.UNKNOWN


def test_expired() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    assert check_nonce(KEY, "tn_a", n, LATER) is NonceState.EXPIRED
    assert check_nonce(KEY, "tn_a", n, LATER - timedelta(seconds=1)) is NonceState.FRESH


def test_a_forged_expiry_breaks_the_mac() -> None:
    n = mint_nonce(KEY, "tn_a", LATER)
    extended = n[:12] + struct.pack(">I", int(LATER.timestamp()) + 3600) + n[16:]
    assert check_nonce(KEY, "tn_a", extended, LATER) is NonceState.UNKNOWN


def _legacy(key: bytes, tenant: str, expires: datetime) -> bytes:
    # Format 1 exactly as the previous release minted it (40 bytes).
    head = bytes([1]) + b"\x07" * 15 + struct.pack(">I", int(expires.timestamp()))
    t = tenant.encode()
    mac = hmac.new(key, b"sandboxsec attestation nonce v1\x00" + struct.pack(">H", len(t)) + t
                   + head, hashlib.sha256).digest()[:20]
    return head + mac


def test_legacy_40_byte_nonces_are_still_checked() -> None:
    old = _legacy(KEY, "tn_a", LATER)
    assert len(old) == 40 and nonce_expiry(old) == LATER
    assert check_nonce(KEY, "tn_a", old, NOW) is NonceState.FRESH
    assert check_nonce(KEY, "tn_a", old, LATER) is NonceState.EXPIRED
    assert check_nonce(KEY, "tn_b", old, NOW) is NonceState.UNKNOWN
    assert check_nonce(KEY, "tn_a", old[:-1] + bytes([old[-1] ^ 1]), NOW) is NonceState.UNKNOWN


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80), st.sampled_from([None, AK]))
def test_random_bytes_are_unknown(data: bytes, ak: bytes | None) -> None:
    assert check_nonce(KEY, "tn_a", data, NOW, ak_name=ak) is NonceState.UNKNOWN
