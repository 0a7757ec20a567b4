"""Attestation tokens: EAR-shaped JWTs signed with the service's Ed25519 key (JWS, EdDSA).

A token says "this tenant's sandbox, running this image on this AK, was affirmed at this
time".  Its claims follow the shape of the EAT Attestation Result (EAR) with an AR4SI
trustworthiness vector; a relying party verifies it offline with the JWK published at
``GET /v1/attestation/keys``.

Contract: :func:`sign_token` and :func:`verify_token` are pure (``now`` is an argument);
verification checks, in order, the compact form, the header (``alg`` must be ``EdDSA``; no
other value is ever accepted, so ``none`` and HMAC confusions are impossible), the ``kid``,
the signature, the profile, the time window, then the tenant.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec.attestation.errors import (
    TokenExpiredError,
    TokenInvalidError,
    TokenTenantMismatchError,
)

if TYPE_CHECKING:
    from sandboxsec.signing import Signer

__all__ = [
    "EAR_PROFILE",
    "TRUST_AFFIRMING",
    "TRUST_CONTRAINDICATED",
    "TRUST_NONE",
    "TokenClaims",
    "jwk",
    "jwk_thumbprint",
    "sign_token",
    "verify_token",
]

EAR_PROFILE: Final = "tag:github.com,2023:veraison/ear"
VERIFIER_ID: Final = {"developer": "sandboxsec", "build": "sandboxsec-verifier"}
_MAX_TOKEN: Final = 16 * 1024

#: AR4SI trustworthiness claim values used in the vector.
TRUST_NONE: Final = 0
TRUST_AFFIRMING: Final = 2
TRUST_CONTRAINDICATED: Final = 96


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token asserts."""

    attestation_id: str
    tenant_id: str
    status: str
    trust_vector: Mapping[str, int]
    image_name: str
    image_digest: str
    ak_name: str
    nonce: str
    issued_at: datetime
    expires_at: datetime
    kid: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not text or any(c in text for c in "=+/ \n"):
        raise TokenInvalidError("token segment is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenInvalidError("token segment is not base64url") from None


def jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as an RFC 8037 OKP JWK with its RFC 7638 thumbprint as ``kid``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    return {**key, "kid": jwk_thumbprint(public_key), "alg": "EdDSA", "use": "sig"}


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    members = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}, separators=(",", ":"), sort_keys=True
    )
    return _b64url(hashlib.sha256(members.encode()).digest())


def sign_token(claims: TokenClaims, key: Signer | Ed25519PrivateKey) -> str:
    """Serialise and sign ``claims`` as a compact JWS (``kid`` is taken from the key)."""
    kid = jwk_thumbprint(key.public_key())
    header = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    payload = {
        "eat_profile": EAR_PROFILE,
        "iat": int(claims.issued_at.timestamp()),
        "exp": int(claims.expires_at.timestamp()),
        "jti": claims.attestation_id,
        "ear.verifier-id": VERIFIER_ID,
        "ear.status": claims.status,
        "ear.trustworthiness-vector": dict(claims.trust_vector),
        "sandboxsec.tenant": claims.tenant_id,
        "sandboxsec.image": {"name": claims.image_name, "digest": claims.image_digest},
        "sandboxsec.ak-name": claims.ak_name,
        "eat_nonce": claims.nonce,
    }
    signing_input = (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
    )
    signature = key.sign(signing_input.encode("ascii"))
    return signing_input + "." + _b64url(signature)


def _str(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str):
        raise TokenInvalidError(f"claim {key} is missing or not a string")
    return value


def _int(payload: Mapping[str, Any], key: str) -> int:
    value = payload.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TokenInvalidError(f"claim {key} is missing or not an integer")
    return value


def verify_token(
    token: str,
    keys: Mapping[str, Ed25519PublicKey],
    now: datetime,
    *,
    tenant_id: str | None = None,
) -> TokenClaims:
    """Verify a token against the published keys (by ``kid``) at time ``now``.

    Raises :class:`TokenInvalidError` (shape, header, unknown key, signature, claims),
    :class:`TokenExpiredError`, or :class:`TokenTenantMismatchError` when ``tenant_id`` is
    given and differs.  The caller decides what status it requires.
    """
    # 1. Compact form, bounded.
    if len(token) > _MAX_TOKEN or token.count(".") != 2:
        raise TokenInvalidError("not a compact JWS")
    head_b64, body_b64, sig_b64 = token.split(".")
    # 2. The header pins EdDSA and names a key we publish.
    try:
        header = json.loads(_unb64url(head_b64))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenInvalidError("token header is not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "EdDSA" or "crit" in header:
        raise TokenInvalidError("token header must be alg EdDSA without crit")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenInvalidError("token is signed by an unknown key")
    # 3. The signature over exactly the received bytes.
    try:
        keys[kid].verify(_unb64url(sig_b64), f"{head_b64}.{body_b64}".encode("ascii"))
    except (InvalidSignature, UnicodeEncodeError):
        raise TokenInvalidError("token signature does not verify") from None
    # 4. The claims: profile, shape, time window, tenant.
    try:
        payload = json.loads(_unb64url(body_b64))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenInvalidError("token payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("eat_profile") != EAR_PROFILE:
        raise TokenInvalidError("token is not an EAR attestation result")
    issued, expires = _int(payload, "iat"), _int(payload, "exp")
    vector = payload.get("ear.trustworthiness-vector")
    image = payload.get("sandboxsec.image")
    if not isinstance(vector, dict) or not all(isinstance(v, int) for v in vector.values()):
        raise TokenInvalidError("token trustworthiness vector is malformed")
    if not isinstance(image, dict):
        raise TokenInvalidError("token image claim is malformed")
    try:
        issued_at = datetime.fromtimestamp(issued, UTC)
        expires_at = datetime.fromtimestamp(expires, UTC)
    except (OverflowError, ValueError, OSError):
        raise TokenInvalidError("token times are out of range") from None
    claims = TokenClaims(
        attestation_id=_str(payload, "jti"),
        tenant_id=_str(payload, "sandboxsec.tenant"),
        status=_str(payload, "ear.status"),
        trust_vector=vector,
        image_name=_str(image, "name"),
        image_digest=_str(image, "digest"),
        ak_name=_str(payload, "sandboxsec.ak-name"),
        nonce=_str(payload, "eat_nonce"),
        issued_at=issued_at,
        expires_at=expires_at,
        kid=kid,
    )
    if now.timestamp() >= expires:
        raise TokenExpiredError("the attestation token has expired")
    if now.timestamp() < issued - 60:  # small skew allowance for clustered verifiers
        raise TokenInvalidError("the attestation token is not valid yet")
    if tenant_id is not None and claims.tenant_id != tenant_id:
        raise TokenTenantMismatchError("the attestation token belongs to another tenant")
    return claims
