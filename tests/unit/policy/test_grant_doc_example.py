"""The offline grant check of docs/policy.md runs as written, with a stock JOSE library."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec import jose
from sandboxsec.policy.canonical import params_hash
from sandboxsec.policy.grants import GrantClaims, encode_grant, key_id

DOC = Path(__file__).resolve().parents[3] / "docs" / "policy.md"
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _example() -> str:
    text = DOC.read_text()
    start = text.index("With a stock JOSE")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None
    return match.group(1)


def _grant(params: dict[str, str], key: Ed25519PrivateKey) -> str:
    claims = GrantClaims(
        grant_id="gr_1", tenant_id="tn_a", session_id="ses_1", action="payment",
        resource="payee:acme", params_hash=params_hash(params), approval_id="apr_1",
        issued_at=NOW, expires_at=NOW + timedelta(minutes=5), key_id=key_id(key.public_key()),
    )
    return encode_grant(claims, key)


# joserfc warns that RFC 9864 deprecates the "EdDSA" name; the example keeps it on purpose.
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
def test_the_documented_offline_check_accepts_a_grant_and_refuses_a_forgery() -> None:
    key = Ed25519PrivateKey.generate()
    params = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh"}
    jwks = {"keys": [jose.okp_jwk(key.public_key(), key_id(key.public_key()))]}
    grant = _grant(params, key)
    exec(_example(), {"grant": grant, "jwks": jwks, "params": params, "now": NOW})
    # Changed params, a forged signer and an expired grant all fail the same example.
    with pytest.raises(AssertionError):
        exec(_example(), {"grant": grant, "jwks": jwks, "params": {**params, "amount": "9"},
                          "now": NOW})
    with pytest.raises(AssertionError):
        exec(_example(), {"grant": grant, "jwks": jwks, "params": params,
                          "now": NOW + timedelta(hours=1)})
    other = Ed25519PrivateKey.generate()
    forged = _grant(params, other)
    with pytest.raises(Exception):  # noqa: B017 - joserfc: unknown kid or bad signature
        exec(_example(), {"grant": forged, "jwks": jwks, "params": params, "now": NOW})
