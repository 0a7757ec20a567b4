"""Server nonces of session proofs (pure): issued, accepted, and each refusal with its code."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from sandboxsec.sessions.errors import (
    DpopNonceError,
    DpopNonceInvalidError,
    DpopNonceRequiredError,
)
from sandboxsec.sessions.nonce import NONCE_CHARS, DpopNonces

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
KEY = bytes(range(32))


def nonces(key: bytes = KEY) -> DpopNonces:
    return DpopNonces(key, lifetime_seconds=300, skew_seconds=5)


def test_a_nonce_is_accepted_by_any_holder_of_the_key_within_its_lifetime() -> None:
    nonce = nonces().issue(NOW)
    assert len(nonce) == NONCE_CHARS
    nonces().check(nonce, NOW)  # another worker: same key, no shared state
    nonces().check(nonce, NOW + timedelta(seconds=300))


def test_missing_nonce_asks_for_one() -> None:
    with pytest.raises(DpopNonceRequiredError) as e:
        nonces().check(None, NOW)
    assert e.value.reason == "use_dpop_nonce"
    nonces().check(e.value.nonce, NOW)  # the refusal carries a usable nonce


def test_expired_nonce_asks_for_a_new_one() -> None:
    old = nonces().issue(NOW - timedelta(seconds=301))
    with pytest.raises(DpopNonceRequiredError) as e:
        nonces().check(old, NOW)
    assert e.value.nonce != old


def test_nonce_from_the_future_is_refused() -> None:
    with pytest.raises(DpopNonceRequiredError):
        nonces().check(nonces().issue(NOW + timedelta(seconds=60)), NOW)


def _forge(stamp: datetime) -> str:
    raw = int(stamp.timestamp()).to_bytes(8, "big") + b"\0" * 16
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize("forged", [
    _forge(NOW),                                      # a fresh time, no valid MAC
    DpopNonces(b"k" * 32, lifetime_seconds=300, skew_seconds=5).issue(NOW),  # another key
    "",                                               # empty
    "A" * 31,                                         # short
    "A" * 33,                                         # long
    "A" * 31 + "=",                                   # padded
    "é" * 32,                                         # not base64url
    nonces().issue(NOW)[:-1] + "*",                   # one character off the alphabet
])
def test_forged_nonce_is_refused_with_its_own_code(forged: str) -> None:
    with pytest.raises(DpopNonceInvalidError) as e:
        nonces().check(forged, NOW)
    assert e.value.reason == "dpop_nonce_invalid"
    assert isinstance(e.value, DpopNonceError)


def test_altered_time_breaks_the_mac() -> None:
    raw = bytearray(base64.urlsafe_b64decode(nonces().issue(NOW - timedelta(hours=1)) + "=="))
    raw[7] ^= 0xFF  # move the stamp, keep the MAC
    with pytest.raises(DpopNonceInvalidError):
        nonces().check(base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode(), NOW)


def test_short_key_is_refused() -> None:
    with pytest.raises(ValueError):
        DpopNonces(b"short", lifetime_seconds=300, skew_seconds=5)
