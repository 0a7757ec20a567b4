"""Compact JWS with Ed25519, joserfc-compatible, with the algorithm pinned.

Attestation tokens and grants are both compact JWS (RFC 7515 section 7.1:
``base64url(header).base64url(payload).base64url(signature)``, unpadded) signed with Ed25519
and ``alg`` ``EdDSA`` (RFC 8037), so any JOSE library verifies them offline with the JWK Set
the service publishes.  ``EdDSA`` is the polymorphic name RFC 9864 deprecates in favour of
``Ed25519``; it is kept because it is what deployed JOSE libraries understand, and it is safe
here because the only key type ever accepted is an Ed25519 OKP key: the registry below accepts
that one algorithm and nothing else (no ``none``, no HMAC, no RSA), whatever the header says.

joserfc's base64url decoder refuses padding, foreign characters and non-zero unused bits, so a
token has exactly one spelling; this module adds the size bound, the ``kid`` lookup and
``crit`` refusal.  Verification runs through joserfc; signing writes exactly joserfc's bytes
with one signature call (see :func:`sign_compact`).  Pure functions; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from joserfc import jws
from joserfc.errors import JoseError
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
    return _thumbprint_raw(_raw(public_key))


@lru_cache(maxsize=256)
def _thumbprint_raw(raw: bytes) -> str:
    # Computed on every token signed and every token verified: cached by the key's bytes.
    members = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)},
        separators=(",", ":"), sort_keys=True,
    )
    return b64url_encode(hashlib.sha256(members.encode()).digest())


def okp_jwk(public_key: Ed25519PublicKey, kid: str) -> dict[str, str]:
    """The public key as an RFC 8037 OKP JWK for a JWK Set, with ``kid``, ``alg`` and ``use``."""
    return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(_raw(public_key)), "kid": kid,
            "alg": ALG, "use": "sig"}


def sign_compact(header: Mapping[str, Any], payload: bytes,
                 key: Ed25519PrivateKey | Signer) -> str:
    """``header`` (``alg`` is set to EdDSA) and ``payload`` signed as a compact JWS.

    ``key`` is an in-memory Ed25519 key, or any :class:`Signer` (an HSM-held key: only its
    public half is ever read here, the signature comes from the signer).  A signature made
    through a signer is verified before the token is returned, so a faulty HSM answer never
    leaves as a token that relying parties would refuse.

    The output is byte for byte what ``joserfc.jws.serialize_compact`` writes for the same
    header, payload and key (Ed25519 is deterministic; a test compares the two): the header
    is checked by joserfc's registry and encoded the way joserfc encodes it, once per distinct
    header, and the signature is one Ed25519 signature over the signing input.  Building the
    token through joserfc on every call cost three times the signature itself.
    """
    items = tuple({**header, "alg": ALG}.items())  # joserfc's member order
    segment = (_header_segment(items) if all(isinstance(v, str) for _, v in items)
               else _header_segment.__wrapped__(items))
    signing_input = segment + b"." + _b64url(payload)
    signature = key.sign(signing_input)
    if not isinstance(key, Ed25519PrivateKey):
        try:
            key.public_key().verify(signature, signing_input)
        except InvalidSignature as exc:
            raise JwsError("the signer's signature does not verify", "signature") from exc
    return (signing_input + b"." + _b64url(signature)).decode("ascii")


@lru_cache(maxsize=64)
def _header_segment(items: tuple[tuple[str, Any], ...]) -> bytes:
    """The protected header's base64url segment, checked by joserfc's registry (the header
    members of the tokens and grants this service signs are few and fixed per key)."""
    protected = dict(items)
    try:
        _REGISTRY.check_header(protected)
    except JoseError as exc:
        raise JwsError(f"the JWS header is invalid ({exc.error})") from None
    text = json.dumps(protected, ensure_ascii=True, separators=(",", ":"))
    return _b64url(text.encode("ascii"))


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


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
