"""JSON Web Keys of P-256 session keys and RFC 7638 thumbprints (pure).

Here, below both attestation and sessions, because the verifier names a certified session key
by its thumbprint and the session proofs check against it.  Errors are ``ValueError``; callers
turn them into their own reason codes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["b64url", "ec_jwk", "jwk_thumbprint"]

#: RFC 7638 section 3.2: the required members of each key type.
_REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),
}


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_jwk(x: bytes, y: bytes) -> dict[str, str]:
    """A P-256 public key as a JWK, coordinates left-padded to 32 bytes."""
    if len(x) > 32 or len(y) > 32:
        raise ValueError("P-256 coordinates are at most 32 bytes")
    return {"kty": "EC", "crv": "P-256", "x": b64url(x.rjust(32, b"\0")),
            "y": b64url(y.rjust(32, b"\0"))}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: the required members only, sorted, no whitespace."""
    kty = jwk.get("kty")
    if not isinstance(kty, str) or kty not in _REQUIRED:
        raise ValueError("jwk has no supported kty")
    members = {}
    for name in _REQUIRED[kty]:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"jwk member {name} is missing or not a string")
        members[name] = value
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())
