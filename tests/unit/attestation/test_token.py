"""Attestation tokens: EdDSA JWS, verified offline against the published JWK."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec.attestation import token
from sandboxsec.attestation.errors import (
    TokenExpiredError,
    TokenInvalidError,
    TokenTenantMismatchError,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()


def _claims(**over: object) -> token.TokenClaims:
    base: dict[str, object] = dict(
        attestation_id="att_1", tenant_id="tn_a", status="affirming",
        trust_vector={"instance-identity": 2, "configuration": 2, "executables": 2,
                      "hardware": 2},
        image_name="img", image_digest="sha256:" + "00" * 32, ak_name="000b" + "11" * 32,
        nonce="22" * 32, issued_at=NOW, expires_at=NOW + timedelta(minutes=5), kid="",
    )
    base.update(over)
    return token.TokenClaims(**base)  # type: ignore[arg-type]


def _keys(key: Ed25519PrivateKey = KEY) -> dict[str, Ed25519PublicKey]:
    return {token.jwk_thumbprint(key.public_key()): key.public_key()}


def _b64(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_round_trip_and_ear_shape() -> None:
    jws = token.sign_token(_claims(), KEY)
    claims = token.verify_token(jws, _keys(), NOW, tenant_id="tn_a")
    assert claims.status == "affirming" and claims.attestation_id == "att_1"
    payload = json.loads(base64.urlsafe_b64decode(jws.split(".")[1] + "=="))
    assert payload["eat_profile"] == token.EAR_PROFILE
    assert set(payload["ear.trustworthiness-vector"]) == {
        "instance-identity", "configuration", "executables", "hardware"
    }
    jwk = token.jwk(KEY.public_key())
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and jwk["kid"] == claims.kid


def test_tampered_payload_is_invalid() -> None:
    head, body, sig = token.sign_token(_claims(), KEY).split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=="))
    payload["sandboxsec.tenant"] = "tn_b"
    with pytest.raises(TokenInvalidError):
        token.verify_token(f"{head}.{_b64(payload)}.{sig}", _keys(), NOW)


def test_flipped_signature_and_other_key() -> None:
    jws = token.sign_token(_claims(), KEY)
    flipped = jws[:-2] + ("A" if jws[-2] != "A" else "B") + jws[-1]
    with pytest.raises(TokenInvalidError):
        token.verify_token(flipped, _keys(), NOW)
    with pytest.raises(TokenInvalidError, match="unknown key"):
        token.verify_token(jws, _keys(Ed25519PrivateKey.generate()), NOW)


@pytest.mark.parametrize("alg", ["none", "HS256", "ES256"])
def test_alg_confusion_refused(alg: str) -> None:
    _, body, sig = token.sign_token(_claims(), KEY).split(".")
    kid = token.jwk_thumbprint(KEY.public_key())
    with pytest.raises(TokenInvalidError):
        token.verify_token(f"{_b64({'alg': alg, 'kid': kid})}.{body}.{sig}", _keys(), NOW)


def test_expired_and_other_tenant() -> None:
    jws = token.sign_token(_claims(), KEY)
    with pytest.raises(TokenExpiredError):
        token.verify_token(jws, _keys(), NOW + timedelta(minutes=5))
    with pytest.raises(TokenTenantMismatchError):
        token.verify_token(jws, _keys(), NOW, tenant_id="tn_b")


@pytest.mark.parametrize("garbage", ["", "a.b", "a.b.c", "x" * 20000, "..", "é.é.é"])
def test_garbage_is_invalid(garbage: str) -> None:
    with pytest.raises(TokenInvalidError):
        token.verify_token(garbage, _keys(), NOW)
