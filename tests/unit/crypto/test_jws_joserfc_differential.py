"""The service signs compact JWS without going through joserfc on every call; these tests hold
it to joserfc's exact output (Ed25519 is deterministic, so the bytes must be equal) and to
stock joserfc's verification as a relying party runs it from the published JWK Set."""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jws
from joserfc.errors import BadSignatureError, SecurityWarning
from joserfc.jwk import KeySet, OKPKey

from sandboxsec import jose
from sandboxsec.attestation import token
from sandboxsec.policy.grants import GrantClaims, encode_grant, key_id

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

HEADERS = [
    {"kid": "k1"},
    {"kid": "k1", "typ": "JWT"},
    {"typ": "JWT", "kid": "k1", "alg": "none"},  # alg keeps its place and becomes EdDSA
    {"alg": "HS256", "kid": "Ünïcödé kid ✓"},  # non-ASCII is escaped as joserfc does
    {"kid": "k1", "typ": "sandboxsec-grant+jwt"},
]
PAYLOADS = [b"", b"{}", b'{"a":1}', "{\"x\":\"\u00e9\u2713\"}".encode(), bytes(range(256)),
            b"?" * 1000 + b">" * 7]


def _joserfc(header: dict[str, str], payload: bytes, key: Ed25519PrivateKey) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return jws.serialize_compact({**header, "alg": "EdDSA"}, payload, OKPKey(key, key),
                                     algorithms=["EdDSA"])


def _stock_verify(compact: str, key: Ed25519PrivateKey, kid: str) -> bytes:
    jwks = {"keys": [jose.okp_jwk(key.public_key(), kid)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        obj = jws.deserialize_compact(compact, KeySet.import_key_set(jwks),  # type: ignore[arg-type]
                                      algorithms=["EdDSA"])
    return bytes(obj.payload)


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_token_is_byte_for_byte_what_joserfc_writes(header: dict[str, str],
                                                        payload: bytes) -> None:
    ours = jose.sign_compact(header, payload, KEY)
    assert ours == _joserfc(header, payload, KEY)
    # And a second call (the header segment now cached) gives the same bytes.
    assert jose.sign_compact(dict(header), payload, KEY) == ours


def test_attestation_tokens_verify_with_stock_joserfc_and_carry_their_claims() -> None:
    key = Ed25519PrivateKey.generate()
    claims = token.TokenClaims(
        attestation_id="att_1", tenant_id="tn_a", status="affirming",
        trust_vector={"hardware": 2, "executables": 2}, image_name="img",
        image_digest="sha256:" + "ab" * 32, ak_name="000b" + "cd" * 32, nonce="bm9uY2U=",
        issued_at=NOW, expires_at=NOW + timedelta(minutes=5), kid="", jkt="j" * 43)
    compact = token.sign_token(claims, key)
    kid = token.jwk_thumbprint(key.public_key())
    payload = json.loads(_stock_verify(compact, key, kid))
    assert payload["jti"] == "att_1" and payload["cnf"] == {"jkt": "j" * 43}
    back = token.verify_token(compact, {kid: key.public_key()}, NOW, tenant_id="tn_a")
    assert back.attestation_id == "att_1" and back.kid == kid
    # Another key's JWK Set refuses it.
    other = Ed25519PrivateKey.generate()
    with pytest.raises(BadSignatureError):
        _stock_verify(compact, other, kid)


def test_grants_verify_with_stock_joserfc() -> None:
    key = Ed25519PrivateKey.generate()
    claims = GrantClaims(
        grant_id="gr_1", tenant_id="tn_a", session_id="ses_1", action="payment",
        resource="payee:acme", params_hash="0" * 64, approval_id="apr_1", issued_at=NOW,
        expires_at=NOW + timedelta(minutes=5), key_id=key_id(key.public_key()))
    grant = encode_grant(claims, key)
    assert json.loads(_stock_verify(grant, key, claims.key_id))["gid"] == "gr_1"


def test_the_thumbprint_is_rfc7638_and_cached_per_key() -> None:
    # RFC 8037 appendix A.3: the thumbprint of its example Ed25519 public key.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sandboxsec.encoding import b64url_decode_strict

    public = Ed25519PublicKey.from_public_bytes(
        b64url_decode_strict("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"))
    assert jose.rfc7638_thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert jose.rfc7638_thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert jose.rfc7638_thumbprint(KEY.public_key()) != jose.rfc7638_thumbprint(public)


@pytest.mark.parametrize("header", [{"kid": 5}, {"kid": "k1", "crit": ["exp"]},
                                    {"kid": "k1", "jku": 7}])
def test_a_header_joserfc_refuses_is_refused(header: dict[str, object]) -> None:
    with pytest.raises(Exception):  # noqa: B017 - joserfc's own error class, whichever it is
        _joserfc(header, b"{}", KEY)  # type: ignore[arg-type]
    with pytest.raises(jose.JwsError):
        jose.sign_compact(header, b"{}", KEY)
