"""Compact JWS with Ed25519, through joserfc, with the algorithm pinned.

Attestation tokens and grants are both compact JWS (RFC 7515 section 7.1:
``base64url(header).base64url(payload).base64url(signature)``, unpadded) signed with Ed25519
and ``alg`` ``EdDSA`` (RFC 8037), so any JOSE library verifies them offline with the JWK Set
the service publishes.  ``EdDSA`` is the polymorphic name RFC 9864 deprecates in favour of
``Ed25519``; it is kept because it is what deployed JOSE libraries understand, and it is safe
here because the only key type ever accepted is an Ed25519 OKP key: the registry below accepts
that one algorithm and nothing else (no ``none``, no HMAC, no RSA), whatever the header says.

joserfc's base64url decoder refuses padding, foreign characters and non-zero unused bits, so a
token has exactly one spelling; this module adds the size bound, the ``kid`` lookup and
``crit`` refusal.  Pure functions; no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry

from sandboxsec.encoding import b64url_encode
from sandboxsec.signing import Signer

__all__ = [
    "ALG",
    "ISSUER",
    "JwsError",
    "okp_jwk",
    "rfc7638_thumbprint",
    "sign_compact",
    "verify_compact",
]

ALG: Final = "EdDSA"
#: ``iss`` of every token and grant this service signs.
ISSUER: Final = "urn:sandboxsec"


class JwsError(ValueError):
    """The compact JWS is malformed, names an unknown key, or its signature does not verify.

    Callers turn it into their own reason code: ``kind`` is ``"malformed"``,
    ``"unknown_key"`` or ``"signature"``; ``reason`` is a sentence.
    """

    def __init__(self, reason: str, kind: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class _PinnedRegistry(JWSRegistry):
    """A registry that knows exactly one algorithm, EdDSA (and so never warns about it)."""

    def get_alg(self, name: str) -> Any:
        if name != ALG:
            raise JwsError(f"alg {name[:20]!r} is not {ALG}")
        return self.algorithms[ALG]


_REGISTRY: Final = _PinnedRegistry(algorithms=[ALG])


@lru_cache(maxsize=64)
def _private(key: Ed25519PrivateKey) -> OKPKey:
    return OKPKey(key, key)


def _public(key: Ed25519PublicKey) -> OKPKey:
    # Public keys are not hashable: cache by their raw bytes.
    return _public_raw(_raw(key))


@lru_cache(maxsize=256)
def _public_raw(raw: bytes) -> OKPKey:
    key = Ed25519PublicKey.from_public_bytes(raw)
    return OKPKey(key, key)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def rfc7638_thumbprint(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order."""
    members = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(_raw(public_key))},
        separators=(",", ":"), sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(members.encode()).digest())


def okp_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """The public key as an RFC 8037 OKP JWK for a JWK Set, with ``kid``, ``alg`` and ``use``."""
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(_raw(public_key)), "kid": kid,
            "alg": ALG, "use": "sig"}


class _HookedEdDSA(JWSAlgModel):
    """EdDSA whose private half is a :class:`Signer` (an HSM key): joserfc builds the signing
    input and the token; the signature is made by the hook, so the key never leaves the HSM."""

    name = ALG
    description = "EdDSA through a signer hook"
    key_type = "OKP"

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    def sign(self, msg: bytes, key: Any) -> bytes:
        return self._signer.sign(msg)

    def verify(self, msg: bytes, sig: bytes, key: Any) -> bool:  # pragma: no cover - unused
        raise JwsError("a signer hook does not verify")


class _HookedRegistry(_PinnedRegistry):
    def __init__(self, signer: Signer) -> None:
        super().__init__(algorithms=[ALG])
        self._alg = _HookedEdDSA(signer)

    def get_alg(self, name: str) -> Any:
        super().get_alg(name)
        return self._alg


def sign_compact(header: Mapping[str, Any], payload: bytes,
                 key: Ed25519PrivateKey | Signer) -> str:
    """``header`` (``alg`` is set to EdDSA) and ``payload`` signed as a compact JWS.

    ``key`` is an in-memory Ed25519 key, or any :class:`Signer` (an HSM-held key: joserfc
    is given only its public half, the signature comes from the signer).  A signature made
    through a signer is verified before the token is returned, so a faulty HSM answer never
    leaves as a token that relying parties would refuse.
    """
    protected = {**header, "alg": ALG}
    if isinstance(key, Ed25519PrivateKey):
        return jws.serialize_compact(protected, payload, _private(key), registry=_REGISTRY)
    public = key.public_key()
    token = jws.serialize_compact(protected, payload, _public(public),
                                  registry=_HookedRegistry(key))
    try:
        jws.deserialize_compact(token, _public(public), registry=_REGISTRY)
    except (JoseError, ValueError) as exc:
        raise JwsError("the signer's signature does not verify", "signature") from exc
    return token


def verify_compact(
    token: str, keys: Mapping[str, Ed25519PublicKey], *, max_chars: int
) -> tuple[dict[str, Any], bytes]:
    """The (header, payload) of a compact JWS signed by one of ``keys`` (by ``kid``).

    Checks, in order: 1. the compact shape, bounded to ``max_chars``; 2. the header is JSON
    with ``alg`` EdDSA, no ``crit``, and a ``kid`` in ``keys``; 3. the signature over exactly
    the received bytes.  Raises :class:`JwsError`; the payload is returned unparsed.
    """
    # 1. Compact form, bounded, before any decoding.
    if not isinstance(token, str) or len(token) > max_chars or token.count(".") != 2:
        raise JwsError("not a compact JWS")
    if not token.isascii():
        raise JwsError("not a compact JWS")
    # 2. The header names a key we publish; crit would name semantics we do not implement.
    try:
        header = jws.extract_compact(token.encode("ascii")).headers()
    except (JoseError, ValueError, TypeError, RecursionError):
        raise JwsError("the JWS header or a segment is malformed") from None
    if not isinstance(header, dict) or header.get("alg") != ALG or "crit" in header:
        raise JwsError(f"the JWS header must be alg {ALG} without crit")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise JwsError("the JWS is signed by an unknown key", "unknown_key")
    # 3. The signature, through the pinned registry.
    try:
        verified = jws.deserialize_compact(token, _public(keys[kid]), registry=_REGISTRY)
    except JwsError:
        raise
    except (JoseError, ValueError, RecursionError):
        raise JwsError("the JWS signature does not verify", "signature") from None
    return header, verified.payload
