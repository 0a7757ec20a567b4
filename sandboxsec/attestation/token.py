"""Attestation tokens: EAR-shaped JWTs signed with the service's Ed25519 key (JWS, EdDSA).

A token says "this tenant's sandbox, running this image on this AK, was affirmed at this
time".  Its claims follow the shape of the EAT Attestation Result (EAR) with an AR4SI
trustworthiness vector; a relying party verifies it offline with the JWK published at
``GET /v1/attestation/keys`` and any JOSE library (``alg`` ``EdDSA``, ``iss``
:data:`~sandboxsec.jose.ISSUER`, ``aud`` :data:`AUDIENCE`).

Contract: :func:`sign_token` and :func:`verify_token` are pure (``now`` is an argument);
verification checks, in order, the compact form, the header (``alg`` must be ``EdDSA``; no
other value is ever accepted, so ``none`` and HMAC confusions are impossible), the ``kid``,
the signature (all through :mod:`sandboxsec.jose`, whose base64url decoding is canonical),
the profile, ``iss`` and ``aud``, the time window, then the tenant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec import jose
from sandboxsec.attestation.errors import (
    TokenExpiredError,
    TokenInvalidError,
    TokenTenantMismatchError,
)

if TYPE_CHECKING:
    from sandboxsec.signing import Signer

__all__ = [
    "AUDIENCE",
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
#: ``aud`` of attestation tokens (grants carry another, so neither passes for the other).
AUDIENCE: Final = "urn:sandboxsec:attestation"
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
    #: RFC 7800 ``cnf.jkt``: the RFC 7638 thumbprint of the certified TPM-held session key.
    jkt: str | None = None


def jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as an RFC 8037 OKP JWK with its RFC 7638 thumbprint as ``kid``."""
    return jose.okp_jwk(public_key, jwk_thumbprint(public_key))


def jwk_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order."""
    return jose.rfc7638_thumbprint(public_key)


def sign_token(claims: TokenClaims, key: Signer | Ed25519PrivateKey) -> str:
    """Serialise and sign ``claims`` as a compact JWS (``kid`` is taken from the key)."""
    kid = jwk_thumbprint(key.public_key())
    header = {"alg": "EdDSA", "typ": "JWT", "kid": kid}
    payload = {
        "iss": jose.ISSUER,
        "aud": AUDIENCE,
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
    if claims.jkt is not None:
        payload["cnf"] = {"jkt": claims.jkt}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return jose.sign_compact(header, body, key)


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
    # 1-3. Compact form, pinned header, known kid, signature (canonical base64url only).
    try:
        header, body = jose.verify_compact(token, keys, max_chars=_MAX_TOKEN)
    except jose.JwsError as exc:
        raise TokenInvalidError(f"token refused: {exc.reason}") from None
    kid = str(header["kid"])
    # 4. The claims: profile, issuer and audience, shape, time window, tenant.
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenInvalidError("token payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("eat_profile") != EAR_PROFILE:
        raise TokenInvalidError("token is not an EAR attestation result")
    if payload.get("iss") != jose.ISSUER or payload.get("aud") != AUDIENCE:
        raise TokenInvalidError("token issuer or audience is not this service's attestation")
    issued, expires = _int(payload, "iat"), _int(payload, "exp")
    vector = payload.get("ear.trustworthiness-vector")
    image = payload.get("sandboxsec.image")
    if not isinstance(vector, dict) or not all(isinstance(v, int) for v in vector.values()):
        raise TokenInvalidError("token trustworthiness vector is malformed")
    if not isinstance(image, dict):
        raise TokenInvalidError("token image claim is malformed")
    cnf = payload.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    if cnf is not None and (not isinstance(jkt, str) or len(jkt) != 43):
        raise TokenInvalidError("token cnf claim is malformed")
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
        jkt=jkt,
    )
    if now.timestamp() >= expires:
        raise TokenExpiredError("the attestation token has expired")
    if now.timestamp() < issued - 60:  # small skew allowance for clustered verifiers
        raise TokenInvalidError("the attestation token is not valid yet")
    if tenant_id is not None and claims.tenant_id != tenant_id:
        raise TokenTenantMismatchError("the attestation token belongs to another tenant")
    return claims
