"""Offline pre-checks of grants, from the service's published keys.

A downstream (a payment system, say) that must not execute twice uses the online check
(``DownstreamClient.verify_grant``): only the service knows whether a grant was used.  The
offline check here answers "was this grant issued by the service, for exactly this action and
these params, and is it unexpired?" without a round trip; it cannot know about single use.

Grant formats are pluggable: a :class:`GrantDecoder` turns a token and the published keys into
:class:`~sandboxsec_client.models.GrantClaims`.  :class:`JwsGrantDecoder` reads the compact
JWS grants the service issues (``docs/policy.md``), :class:`Sgr1Decoder` the earlier ``sgr1``
form, and :class:`GrantTokenDecoder` (the default) picks by shape.  Keys come from the JWK Set
at ``GET /v1/grants/jwks`` (``{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid", "x"}]}``) or
``GET /v1/grants/keys`` (``{"keys": {kid: base64 raw Ed25519}}``);
:func:`parse_published_keys` reads both.

``params_hash`` is recomputed here independently of the service's code (same documented
canonical form: RFC 8785 restricted to values with one spelling; floats are refused).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec_client.errors import ClientError
from sandboxsec_client.models import GrantClaims

__all__ = [
    "GrantDecoder",
    "GrantInvalid",
    "GrantTokenDecoder",
    "JwsGrantDecoder",
    "Sgr1Decoder",
    "canonical_json",
    "check_claims",
    "params_hash",
    "parse_published_keys",
    "verify_offline",
]

MAX_SAFE_INTEGER = 2**53 - 1
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
            "\t": "\\t"}
_CONTROL = re.compile(r'["\\\x00-\x1f]')
_SGR1_MEMBERS = frozenset({"v", "gid", "tid", "sid", "act", "res", "ph", "aid", "iat", "exp",
                           "kid"})
_JWS_MEMBERS = _SGR1_MEMBERS | {"iss", "aud"}
_JWS_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})
GRANT_TYP = "sandboxsec-grant+jws"
GRANT_ISSUER = "urn:sandboxsec"
GRANT_AUDIENCE = "urn:sandboxsec:grant"
MAX_TOKEN_CHARS = 4096


class GrantInvalid(ClientError):
    """The grant failed an offline check; ``code`` uses the service's reason codes
    (``grant_malformed``, ``grant_signature_invalid``, ``grant_expired``,
    ``grant_action_mismatch``, ``grant_params_mismatch``, ``grant_resource_mismatch``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _string(value: str) -> str:
    value.encode("utf-8")  # lone surrogates raise UnicodeEncodeError
    return '"' + _CONTROL.sub(lambda m: _ESCAPES.get(m.group(0), f"\\u{ord(m.group(0)):04x}"),
                              value) + '"'


def _canonical(value: Any, depth: int) -> str:
    if depth > 16:
        raise ValueError("nested deeper than 16 levels")
    if value is True or value is False or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ValueError("integer outside +-(2^53 - 1)")
        return str(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("object member names must be strings")
        names = sorted(value, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(f"{_string(k)}:{_canonical(value[k], depth + 1)}"
                              for k in names) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(v, depth + 1) for v in value) + "]"
    # floats included: amounts travel as decimal strings, so binary rounding cannot alter them
    raise ValueError(f"{type(value).__name__} values have no canonical form")


def canonical_json(value: Any) -> bytes:
    """The canonical bytes of ``value`` as ``docs/policy.md`` defines them; ``ValueError``
    for values with no single spelling (floats, unsafe integers, lone surrogates)."""
    try:
        return _canonical(value, 0).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("strings must be valid Unicode") from exc


def params_hash(params: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the canonical params: what an approver approves."""
    if not isinstance(params, Mapping):
        raise ValueError("params must be a JSON object")
    return hashlib.sha256(canonical_json(params)).hexdigest()


def _b64url(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise GrantInvalid("grant_malformed", "segments must be unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise GrantInvalid("grant_malformed", "a segment is not base64url") from None
    # One spelling per value: unused trailing bits set would give a second token for it.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise GrantInvalid("grant_malformed", "a segment is not canonical base64url")
    return raw


def parse_published_keys(document: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    """Ed25519 keys by key id from ``/v1/grants/keys`` or a JWKS document.

    A key that is not Ed25519 is skipped (never trusted); a malformed one raises
    :class:`GrantInvalid` (``grant_keys_invalid``).
    """
    keys = document.get("keys")
    out: dict[str, Ed25519PublicKey] = {}
    try:
        if isinstance(keys, Mapping):
            for kid, b64 in keys.items():
                out[str(kid)] = Ed25519PublicKey.from_public_bytes(base64.b64decode(b64))
        elif isinstance(keys, list):
            for jwk in keys:
                if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "kid" in jwk:
                    out[str(jwk["kid"])] = Ed25519PublicKey.from_public_bytes(
                        _b64url(str(jwk["x"])))
        else:
            raise ValueError("no keys")
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise GrantInvalid("grant_keys_invalid", f"published keys are malformed: {exc}") from None
    return out


class GrantDecoder(Protocol):
    """Turns a token into verified claims (signature checked, claims not yet compared)."""

    def decode(self, token: str, keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
        """The claims of a token whose signature verifies under one of ``keys``."""
        ...


class Sgr1Decoder:
    """The ``sgr1.<payload>.<signature>`` grant format (``docs/policy.md``)."""

    def decode(self, token: str, keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
        """Check, in order: 1. shape, 2. canonical payload with exactly the v1 members,
        3. a known key id and an Ed25519 signature over ``sgr1.<payload>``."""
        # 1. shape
        parts = token.split(".") if isinstance(token, str) and len(token) <= 4096 else []
        if len(parts) != 3 or parts[0] != "sgr1":
            raise GrantInvalid("grant_malformed", "not an sgr1 grant")
        payload_bytes, signature = _b64url(parts[1]), _b64url(parts[2])
        # 2. payload
        try:
            p = json.loads(payload_bytes)
            canonical = canonical_json(p)
        except ValueError:
            raise GrantInvalid("grant_malformed", "payload is not canonical JSON") from None
        if (not isinstance(p, dict) or set(p) != _SGR1_MEMBERS or p["v"] != 1
                or canonical != payload_bytes):
            raise GrantInvalid("grant_malformed", "payload is not a canonical version 1 grant")
        # 3. signature
        key = keys.get(p["kid"]) if isinstance(p["kid"], str) else None
        if key is None:
            raise GrantInvalid("grant_signature_invalid", "signed by an unknown key")
        try:
            key.verify(signature, f"sgr1.{parts[1]}".encode("ascii"))
        except InvalidSignature:
            raise GrantInvalid("grant_signature_invalid", "signature does not verify") from None
        return _claims_of(p)


def _claims_of(p: Mapping[str, Any]) -> GrantClaims:
    strings = ("gid", "tid", "sid", "act", "res", "ph", "kid", "iat", "exp")
    if not all(isinstance(p[k], str) for k in strings) or not (
            p["aid"] is None or isinstance(p["aid"], str)):
        raise GrantInvalid("grant_malformed", "payload members have the wrong types")
    return GrantClaims(grant_id=p["gid"], tenant_id=p["tid"], session_id=p["sid"],
                       action=p["act"], resource=p["res"], params_hash=p["ph"],
                       approval_id=p["aid"], issued_at=p["iat"], expires_at=p["exp"],
                       key_id=p["kid"])


def _json_segment(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise GrantInvalid("grant_malformed", f"{what} is not JSON") from None


class JwsGrantDecoder:
    """The compact JWS grants the service issues (``docs/policy.md``): header
    ``{"alg":"EdDSA","kid","typ":"sandboxsec-grant+jws"}``, canonical JSON payload."""

    def decode(self, token: str, keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
        """Check, in order: 1. shape, 2. header (EdDSA only, no ``crit``, the grant type, a
        known ``kid``) and the Ed25519 signature over ``header.payload``, 3. canonical
        payload with exactly the version 2 members, this service's ``iss`` and ``aud``, and
        the header's ``kid``."""
        # 1. shape
        parts = (token.split(".") if isinstance(token, str) and len(token) <= MAX_TOKEN_CHARS
                 else [])
        if len(parts) != 3 or not token.isascii():
            raise GrantInvalid("grant_malformed", "not a compact JWS")
        header_bytes, payload_bytes = _b64url(parts[0]), _b64url(parts[1])
        signature = _b64url(parts[2])
        # 2. header and signature
        header = _json_segment(header_bytes, "header")
        if not isinstance(header, dict) or set(header) != _JWS_HEADER_MEMBERS:
            raise GrantInvalid("grant_malformed", "header must have exactly alg, kid and typ")
        if header["alg"] != "EdDSA":
            raise GrantInvalid("grant_signature_invalid", "algorithm is not EdDSA")
        if header["typ"] != GRANT_TYP:
            raise GrantInvalid("grant_malformed", "the JWS is not a grant (typ)")
        key = keys.get(header["kid"]) if isinstance(header["kid"], str) else None
        if key is None:
            raise GrantInvalid("grant_signature_invalid", "signed by an unknown key")
        try:
            key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"))
        except InvalidSignature:
            raise GrantInvalid("grant_signature_invalid", "signature does not verify") from None
        # 3. payload
        p = _json_segment(payload_bytes, "payload")
        try:
            canonical = canonical_json(p)
        except ValueError:
            raise GrantInvalid("grant_malformed", "payload is not canonical JSON") from None
        if (not isinstance(p, dict) or set(p) != _JWS_MEMBERS or p["v"] != 2
                or canonical != payload_bytes):
            raise GrantInvalid("grant_malformed", "payload is not a canonical version 2 grant")
        if p["iss"] != GRANT_ISSUER or p["aud"] != GRANT_AUDIENCE:
            raise GrantInvalid("grant_malformed", "issuer or audience is not a grant's")
        if p["kid"] != header["kid"]:
            raise GrantInvalid("grant_malformed", "payload kid differs from the header's")
        return _claims_of(p)


class GrantTokenDecoder:
    """The default: ``sgr1.`` tokens by :class:`Sgr1Decoder`, others by
    :class:`JwsGrantDecoder`."""

    def decode(self, token: str, keys: Mapping[str, Ed25519PublicKey]) -> GrantClaims:
        """The claims of ``token`` in whichever of the two formats it has."""
        if isinstance(token, str) and token.startswith("sgr1."):
            return Sgr1Decoder().decode(token, keys)
        return JwsGrantDecoder().decode(token, keys)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def check_claims(claims: GrantClaims, *, action: str, params: Mapping[str, Any],
                 resource: str | None, now: datetime) -> None:
    """1. unexpired at ``now``, 2. same action, 3. params hash to the granted hash,
    4. same resource (when given).  Raises :class:`GrantInvalid` with the reason."""
    # 1. expiry
    try:
        expires = datetime.fromisoformat(claims.expires_at)
    except ValueError:
        raise GrantInvalid("grant_malformed", "expiry is not RFC 3339") from None
    if expires.tzinfo is None:
        raise GrantInvalid("grant_malformed", "expiry carries no time zone")
    if now >= expires.astimezone(UTC):
        raise GrantInvalid("grant_expired", f"expired at {claims.expires_at}")
    # 2. action
    if not _same(action, claims.action):
        raise GrantInvalid("grant_action_mismatch", "issued for a different action")
    # 3. params
    try:
        got = params_hash(params)
    except ValueError as exc:
        raise GrantInvalid("params_not_canonical", str(exc)) from None
    if not _same(got, claims.params_hash):
        raise GrantInvalid("grant_params_mismatch", "params differ from the approved ones")
    # 4. resource
    if resource is not None and not _same(resource, claims.resource):
        raise GrantInvalid("grant_resource_mismatch", "issued for a different resource")


def verify_offline(token: str, keys: Mapping[str, Ed25519PublicKey], *, action: str,
                   params: Mapping[str, Any], resource: str | None = None,
                   now: datetime | None = None,
                   decoder: GrantDecoder | None = None) -> GrantClaims:
    """Decode and check a grant without the service; single use is NOT checked."""
    claims = (decoder or GrantTokenDecoder()).decode(token, keys)
    check_claims(claims, action=action, params=params, resource=resource,
                 now=now or datetime.now(UTC))
    return claims
