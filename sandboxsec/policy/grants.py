"""Grant tokens: Ed25519-signed, single-use permission for one exact action.

Format (documented in ``docs/policy.md`` so a downstream can check it offline with any JOSE
library): a compact JWS (RFC 7515), ``base64url(header).base64url(payload).base64url(sig)``,
unpadded base64url, where

* ``header`` is ``{"alg":"EdDSA","kid":<kid>,"typ":"sandboxsec-grant+jws"}``;
* ``payload`` is the canonical JSON (see :mod:`sandboxsec.policy.canonical`, RFC 8785) of an
  object with the members ``v`` (2), ``iss`` (``urn:sandboxsec``), ``aud``
  (``urn:sandboxsec:grant``), ``gid`` (grant id), ``tid`` (tenant), ``sid`` (session),
  ``act`` (action), ``res`` (resource), ``ph`` (params_hash), ``aid`` (approval id or null),
  ``iat`` and ``exp`` (RFC 3339 UTC strings) and ``kid`` (signing key id, equal to the
  header's);
* the signature is Ed25519 over the ASCII bytes ``header.payload`` (standard JWS).

``kid`` is the first 16 hex characters of SHA-256 over the raw 32-byte public key; the keys
are published as a JWK Set at ``GET /v1/grants/jwks``.  The previous form,
``sgr1.<base64url(payload)>.<base64url(signature)>`` with ``v`` 1 and no ``iss``/``aud``, is
still accepted by :func:`decode_grant` (grants live minutes) but no longer issued.

A signature alone never makes a grant usable: single use is enforced by the service, which
marks the grant used in the database (``POST /v1/grants/verify``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sandboxsec import jose
from sandboxsec.clock import rfc3339
from sandboxsec.encoding import b64url_decode_strict
from sandboxsec.policy.canonical import canonical_json
from sandboxsec.policy.errors import (
    GrantActionMismatchError,
    GrantExpiredError,
    GrantMalformedError,
    GrantParamsMismatchError,
    GrantResourceMismatchError,
    GrantSignatureInvalidError,
    ParamsNotCanonicalError,
    ParamsTooLargeError,
)

if TYPE_CHECKING:
    from sandboxsec.signing import Signer

__all__ = [
    "AUDIENCE",
    "GRANT_PREFIX",
    "GRANT_TYP",
    "MAX_TOKEN_CHARS",
    "GrantClaims",
    "check_grant",
    "decode_grant",
    "encode_grant",
    "key_id",
]

GRANT_PREFIX = "sgr1"  # the legacy form, still decoded
GRANT_TYP = "sandboxsec-grant+jws"
#: ``aud`` of grants (attestation tokens carry another, so neither passes for the other).
AUDIENCE = "urn:sandboxsec:grant"
MAX_TOKEN_CHARS = 4096
_FIELDS_V1 = frozenset({"v", "gid", "tid", "sid", "act", "res", "ph", "aid", "iat", "exp", "kid"})
_FIELDS = _FIELDS_V1 | {"iss", "aud"}


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of SHA-256 over the raw public key."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class GrantClaims:
    """What a grant binds: tenant, session, the exact action, resource and params_hash."""

    grant_id: str
    tenant_id: str
    session_id: str
    action: str
    resource: str
    params_hash: str
    approval_id: str | None
    issued_at: datetime
    expires_at: datetime
    key_id: str

    def payload(self) -> dict[str, Any]:
        """The JWS payload members (version 2)."""
        return {
            "v": 2,
            "iss": jose.ISSUER,
            "aud": AUDIENCE,
            "gid": self.grant_id,
            "tid": self.tenant_id,
            "sid": self.session_id,
            "act": self.action,
            "res": self.resource,
            "ph": self.params_hash,
            "aid": self.approval_id,
            "iat": rfc3339(self.issued_at),
            "exp": rfc3339(self.expires_at),
            "kid": self.key_id,
        }


def _b64d(text: str) -> bytes:
    try:
        return b64url_decode_strict(text)
    except ValueError:
        raise GrantMalformedError("grant token segments must be canonical base64url") from None


def encode_grant(claims: GrantClaims, private_key: Signer | Ed25519PrivateKey) -> str:
    """The signed compact JWS for ``claims`` (deterministic: Ed25519 signatures are)."""
    if claims.key_id != key_id(private_key.public_key()):
        raise ValueError("claims.key_id does not name this signing key")
    header = {"alg": jose.ALG, "kid": claims.key_id, "typ": GRANT_TYP}
    return jose.sign_compact(header, canonical_json(claims.payload()), private_key)


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise GrantMalformedError("grant times must be RFC 3339 strings")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise GrantMalformedError("grant times must be RFC 3339 strings") from None
    if parsed.tzinfo is None:
        raise GrantMalformedError("grant times must carry a time zone")
    return parsed.astimezone(UTC)


def decode_grant(token: str, public_keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
    """Parse ``token`` and verify its signature; the claims are *not* yet checked.

    Checks, in order:

    1. shape: a compact JWS (or the legacy ``sgr1.<payload>.<signature>``), bounded length,
       canonical base64url segments;
    2. the header: ``alg`` EdDSA only, no ``crit``, ``typ`` a grant, a ``kid`` of
       ``public_keys``; and the signature verifies;
    3. payload: canonical JSON object with exactly the documented members, ``iss`` and
       ``aud`` this service's grants, and the same ``kid`` as the header.
    """
    # 1. shape
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise GrantMalformedError("grant token is missing or too long")
    if token.startswith(GRANT_PREFIX + "."):
        return _decode_sgr1(token, public_keys)
    # 2. header and signature
    try:
        header, payload_bytes = jose.verify_compact(token, public_keys, max_chars=MAX_TOKEN_CHARS)
    except jose.JwsError as exc:
        if exc.kind == "malformed":
            raise GrantMalformedError(f"grant token refused: {exc.reason}") from None
        raise GrantSignatureInvalidError(f"grant refused: {exc.reason}") from None
    if header.get("typ") != GRANT_TYP:
        raise GrantMalformedError("the JWS is not a grant (typ)")
    # 3. payload
    payload = _payload(payload_bytes, version=2, members=_FIELDS)
    if payload["iss"] != jose.ISSUER or payload["aud"] != AUDIENCE:
        raise GrantMalformedError("the grant's issuer or audience is not this service's grants")
    if payload["kid"] != header["kid"]:
        raise GrantMalformedError("the grant's kid differs from its header's")
    return _claims(payload)


def _decode_sgr1(token: str, public_keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
    """The legacy ``sgr1`` form: the same checks, the signature over ``sgr1.<payload>``."""
    parts = token.split(".")
    if len(parts) != 3:
        raise GrantMalformedError("grant token must look like sgr1.<payload>.<signature>")
    payload_bytes = _b64d(parts[1])
    signature = _b64d(parts[2])
    payload = _payload(payload_bytes, version=1, members=_FIELDS_V1)
    public_key = public_keys.get(payload["kid"])
    if public_key is None:
        raise GrantSignatureInvalidError("grant is signed by an unknown key")
    try:
        public_key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
    except InvalidSignature:
        raise GrantSignatureInvalidError("grant signature does not verify") from None
    return _claims(payload)


def _payload(payload_bytes: bytes, *, version: int, members: frozenset[str]) -> dict[str, Any]:
    try:
        payload = json.loads(payload_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise GrantMalformedError("grant payload is not JSON") from None
    if not isinstance(payload, dict) or set(payload) != members or payload.get("v") != version:
        raise GrantMalformedError(f"grant payload does not have the version {version} members")
    try:
        canonical = canonical_json(payload)
    except (ParamsNotCanonicalError, ParamsTooLargeError):
        raise GrantMalformedError("grant payload is not in canonical form") from None
    if canonical != payload_bytes:
        raise GrantMalformedError("grant payload is not in canonical form")
    str_fields = ("gid", "tid", "sid", "act", "res", "ph", "kid")
    if not all(isinstance(payload[f], str) for f in str_fields) or not (
        payload["aid"] is None or isinstance(payload["aid"], str)
    ):
        raise GrantMalformedError("grant payload members have the wrong types")
    return payload


def _claims(payload: Mapping[str, Any]) -> GrantClaims:
    return GrantClaims(
        grant_id=payload["gid"],
        tenant_id=payload["tid"],
        session_id=payload["sid"],
        action=payload["act"],
        resource=payload["res"],
        params_hash=payload["ph"],
        approval_id=payload["aid"],
        issued_at=_parse_time(payload["iat"]),
        expires_at=_parse_time(payload["exp"]),
        key_id=payload["kid"],
    )


def check_grant(
    claims: GrantClaims,
    *,
    now: datetime,
    action: str,
    params_hash: str,
    resource: str | None = None,
) -> None:
    """Check a decoded grant against what the downstream is about to do.

    1. not expired at ``now``;
    2. the action is the granted one;
    3. the params hash to the granted params_hash (any change breaks it);
    4. when given, the resource is the granted one.
    """
    # 1. expiry
    if now >= claims.expires_at:
        raise GrantExpiredError(f"the grant expired at {rfc3339(claims.expires_at)}")
    # 2. action
    if not hmac.compare_digest(action.encode(), claims.action.encode()):
        raise GrantActionMismatchError("the grant was issued for a different action")
    # 3. params
    if not hmac.compare_digest(params_hash.encode(), claims.params_hash.encode()):
        raise GrantParamsMismatchError("the params differ from the ones that were approved")
    # 4. resource
    if resource is not None and not hmac.compare_digest(
        resource.encode(), claims.resource.encode()
    ):
        raise GrantResourceMismatchError("the grant was issued for a different resource")
