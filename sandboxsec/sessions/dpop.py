"""Session proofs: RFC 9449 (DPoP) proof JWTs signed by the sandbox's TPM-held session key.

A proof is a compact JWS whose header carries the public key and whose claims bind one HTTP
request: its method (``htm``), URL without query (``htu``), issue time (``iat``), a unique id
(``jti``), the session (``sid``), the SHA-256 of the exact body bytes (``bh``) and of the API
key the request carries (``ath``, as RFC 9449 binds an access token).  The format, byte for
byte, is in ``docs/api.md``.

Contract: everything here is pure.  :func:`create_proof` takes a *signer* callable (the TPM in
a sandbox, a software key in tests and SDKs) and ``now``; :func:`verify_proof` takes the
proof, the request as received, the session's key thumbprint and ``now``, and returns the
verified claims or raises one typed error of :mod:`sandboxsec.sessions.errors`.  Single use
of ``jti`` is the caller's job (a store shared by all workers), after verification.
:func:`check_proof` runs every check but the signature and hands it back prepared
(:class:`ProofSignature`), for a caller that checks it while the request goes on
(:mod:`sandboxsec.sessions.signatures`); the reason codes stay those of the order below,
because a refusal by checks 5-6 is only given once the signature verified.

Checks of :func:`verify_proof`, in order (RFC 9449 section 4.3):

0. one compact JWS, bounded in size, strict unpadded base64url;
1. header: ``typ`` is ``dpop+jwt``, ``alg`` is ``ES256`` (the only one allowed), no ``crit``,
   ``jwk`` is a public P-256 key with no private member;
2. claims: each present with its type;
3. the RFC 7638 thumbprint of ``jwk`` is the session's ``jkt``;
4. the signature (raw ``r || s``, 64 bytes) verifies under that key;
5. ``sid``, ``htm``, ``htu`` (normalised), ``bh`` and ``ath`` match the request;
6. ``iat`` is inside ``[now - max_age, now + skew]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from sandboxsec_client.proofs import create_proof as _client_proof

from sandboxsec.attestation.jwk import b64url, ec_jwk
from sandboxsec.attestation.jwk import jwk_thumbprint as _thumbprint
from sandboxsec.encoding import b64url_decode_strict
from sandboxsec.sessions.errors import (
    DpopAthMismatchError,
    DpopBodyMismatchError,
    DpopError,
    DpopKeyMismatchError,
    DpopMalformedError,
    DpopMethodMismatchError,
    DpopSessionMismatchError,
    DpopSignatureInvalidError,
    DpopStaleError,
    DpopUrlMismatchError,
)
from sandboxsec.sessions.lru import Lru

__all__ = [
    "ALG",
    "MAX_PROOF_CHARS",
    "TYP",
    "CheckedProof",
    "KeyCache",
    "ProofSignature",
    "Signer",
    "VerifiedProof",
    "ath_of",
    "b64url",
    "body_hash",
    "check_proof",
    "create_proof",
    "der_to_raw",
    "ec_jwk",
    "jwk_thumbprint",
    "normalize_url",
    "require_signature",
    "verify_proof",
    "verify_signature",
]

TYP: Final = "dpop+jwt"
ALG: Final = "ES256"
#: A P-256 proof is about 600 characters; anything much larger is refused unread.
MAX_PROOF_CHARS: Final = 4096
_MAX_CLAIM: Final = 512
_PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_EC_MEMBERS: Final = ("crv", "kty", "x", "y")
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}

#: Signs the JWS signing input; returns the raw ``r || s`` signature (64 bytes for ES256).
Signer = Callable[[bytes], bytes]


def _unb64url(text: str, what: str) -> bytes:
    # Strict: the alphabet only, no padding, no whitespace, and the one canonical spelling.
    try:
        return b64url_decode_strict(text)
    except ValueError:
        raise DpopMalformedError(f"{what} is not unpadded base64url") from None


def body_hash(body: bytes) -> str:
    """The ``bh`` claim: base64url SHA-256 of the exact request body bytes (empty: b"")."""
    return b64url(hashlib.sha256(body).digest())


def ath_of(api_key: str) -> str:
    """The ``ath`` claim: base64url SHA-256 of the API key as sent (RFC 9449 section 4.2)."""
    return b64url(hashlib.sha256(api_key.encode("utf-8")).digest())


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (:func:`sandboxsec.attestation.jwk.jwk_thumbprint`);
    a key it cannot name is a malformed proof."""
    try:
        return _thumbprint(jwk)
    except ValueError as exc:
        raise DpopMalformedError(str(exc)) from None


def der_to_raw(der: bytes, size: int = 32) -> bytes:
    """An ASN.1 DER ECDSA signature as JWS wants it: ``r || s``, each left-padded to ``size``."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


@lru_cache(maxsize=1024)
def normalize_url(url: str) -> str:
    """``scheme://host[:port]/path`` lower-cased where case does not matter, default port
    dropped, query and fragment removed (RFC 9449 section 4.3, RFC 3986 section 6.2.2)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise DpopMalformedError("htu is not a URL") from None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        raise DpopMalformedError("htu must be an http(s) URL with a host and no user info")
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    if ":" in host:  # an IPv6 literal keeps its brackets
        netloc = f"[{host}]" if port in (None, _DEFAULT_PORTS[scheme]) else f"[{host}]:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def create_proof(
    signer: Signer,
    jwk: Mapping[str, str],
    *,
    method: str,
    url: str,
    session_id: str,
    body: bytes,
    now: datetime,
    api_key: str | None = None,
    jti: str | None = None,
    nonce: str | None = None,
) -> str:
    """A proof for one request, signed by ``signer`` (the session key), as a compact JWS.

    ``url`` is the full URL the request is sent to (query and fragment are dropped);
    ``body`` the exact bytes sent (``b""`` for none); ``api_key`` the bearer key sent with it;
    ``nonce`` the last ``DPoP-Nonce`` the service sent (RFC 9449 section 8), if any.
    The bytes are made by the client distribution (:func:`sandboxsec_client.proofs.
    create_proof`), so what the service verifies is what every client sends.
    """
    try:
        normalize_url(url)
    except DpopMalformedError as exc:
        raise ValueError(str(exc)) from None
    return _client_proof(signer, jwk, method=method, url=url, session_id=session_id,
                         body=body, iat=int(now.timestamp()), api_key=api_key, jti=jti,
                         nonce=nonce)


class KeyCache:
    """Proof headers already checked, by their exact base64url text (bounded LRU).

    A sandbox sends the same header (``typ``, ``alg``, its ``jwk``) with every proof, so the
    header's JSON, its thumbprint and the parsed P-256 key are computed once per key: a hit
    skips check 1 and the thumbprint computation of check 3.  Only headers whose proof
    verified are kept (a forged header costs its sender a full parse every time).
    """

    def __init__(self, size: int = 4096) -> None:
        self._headers: Lru[str, _Header] = Lru(size)

    def lookup(self, head_b64: str) -> _Header | None:
        """The checked header spelled exactly ``head_b64``, if one verified before."""
        return self._headers.get(head_b64)

    def remember(self, head_b64: str, entry: _Header) -> None:
        """Keep a header whose proof verified."""
        self._headers.put(head_b64, entry)

    def verified(self, signature: ProofSignature) -> None:
        """Keep the header of ``signature``, which verified (a no-op when it was kept)."""
        if signature.fresh_header is not None:
            self.remember(signature.head_b64, signature.fresh_header)


@dataclass(frozen=True, slots=True)
class _Header:
    jwk: dict[str, Any]
    jkt: str
    key: ec.EllipticCurvePublicKey
    #: the key as an uncompressed SEC1 point (``0x04 || x || y``)
    point: bytes


def _p256_key(jwk: Mapping[str, Any]) -> tuple[ec.EllipticCurvePublicKey, bytes]:
    x = _unb64url(str(jwk.get("x", "")), "jwk x")
    y = _unb64url(str(jwk.get("y", "")), "jwk y")
    if len(x) != 32 or len(y) != 32:
        raise DpopMalformedError("jwk coordinates must be 32 bytes each")
    point = b"\x04" + x + y
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point), point
    except ValueError:
        raise DpopMalformedError("jwk is not a point on P-256") from None


@dataclass(frozen=True, slots=True)
class ProofSignature:
    """Check 4 of a proof, prepared and not yet run: the key (a point on P-256 that
    ``cryptography`` accepted), the raw ``r || s`` signature (64 bytes) and the exact bytes
    it signs."""

    key: ec.EllipticCurvePublicKey
    point: bytes
    raw: bytes
    message: bytes
    head_b64: str
    #: the checked header, when it is not in the key cache yet (kept once this verifies)
    fresh_header: _Header | None

    def verify(self) -> bool:
        """Whether the signature verifies (``cryptography``, in this thread)."""
        try:
            self.key.verify(_raw_to_der(self.raw), self.message, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True, slots=True)
class CheckedProof:
    """A proof that passed every check but its signature (:func:`check_proof`).  Nothing may
    be acted on until ``signature`` verified."""

    claims: VerifiedProof
    signature: ProofSignature


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """The claims of a proof that verified (``jti`` still has to be claimed once)."""

    jkt: str
    jti: str
    iat: int
    session_id: str
    htm: str
    htu: str
    #: the ``nonce`` claim (RFC 9449 section 8), checked by the caller when it hands them out
    nonce: str | None = None


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        # RFC 7515: the segments are UTF-8 (json.loads would also guess UTF-16 and UTF-32).
        value = json.loads(_unb64url(segment, what).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise DpopMalformedError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise DpopMalformedError(f"{what} is not a JSON object")
    return value


#: The string claims of RFC 9449 (``sid`` and ``bh``, this service's, are checked with the
#: request).
_REQUIRED: Final = ("jti", "htm", "htu")


def _claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > _MAX_CLAIM:
        raise DpopMalformedError(f"claim {name} is missing, empty, too long or not a string")
    return value


def verify_proof(
    proof: str,
    *,
    method: str,
    url: str,
    body: bytes,
    session_id: str,
    jkt: str,
    now: datetime,
    max_age_seconds: int,
    skew_seconds: int,
    api_key: str | None = None,
    keys: KeyCache | None = None,
) -> VerifiedProof:
    """Verify ``proof`` for the request (``method``, ``url`` as the service is reached from
    outside, ``body`` as received) in session ``session_id`` whose key thumbprint is ``jkt``.

    Raises the error of the first check that fails (order in the module docstring).
    """
    checked = check_proof(proof, method=method, url=url, body=body, session_id=session_id,
                          jkt=jkt, now=now, max_age_seconds=max_age_seconds,
                          skew_seconds=skew_seconds, api_key=api_key, keys=keys)
    require_signature(checked.signature, keys)
    return checked.claims


def require_signature(signature: ProofSignature, keys: KeyCache | None = None) -> None:
    """Check 4: raise :class:`DpopSignatureInvalidError` unless ``signature`` verifies (its
    header is then kept in ``keys``)."""
    if not signature.verify():
        raise DpopSignatureInvalidError("the proof signature does not verify")
    if keys is not None:
        keys.verified(signature)


def check_proof(
    proof: str,
    *,
    method: str,
    url: str,
    body: bytes,
    session_id: str,
    jkt: str,
    now: datetime,
    max_age_seconds: int,
    skew_seconds: int,
    api_key: str | None = None,
    keys: KeyCache | None = None,
) -> CheckedProof:
    """Every check of :func:`verify_proof` but the signature, which is returned prepared.

    A proof refused by checks 5-6 has its signature checked first, so the reason code is
    the one :func:`verify_proof` gives: ``dpop_signature_invalid`` for a forged proof
    whatever else is wrong with it.  The caller must verify ``signature`` (and give
    ``keys.verified`` the answer) before it acts on the claims.
    """
    _, claims, signature = _prepare(proof, jkt, keys)
    try:
        verified = _bound(claims, method=method, url=url, body=body, session_id=session_id,
                          jkt=jkt, now=now, max_age_seconds=max_age_seconds,
                          skew_seconds=skew_seconds, api_key=api_key)
    except (DpopError, DpopMalformedError):
        require_signature(signature, keys)
        raise
    return CheckedProof(claims=verified, signature=signature)


def _bound(claims: Mapping[str, Any], *, method: str, url: str, body: bytes, session_id: str,
           jkt: str, now: datetime, max_age_seconds: int, skew_seconds: int,
           api_key: str | None) -> VerifiedProof:
    # Checks 5 and 6.  The _REQUIRED claims are present, non-empty, bounded strings and iat
    # an int (_prepare).  None of the values compared below is secret (the body hash and
    # the API key's hash are of what this very request carries), so == compares them.
    jti, htm, htu = claims["jti"], claims["htm"], claims["htu"]
    sid, bh = _claim(claims, "sid"), _claim(claims, "bh")
    iat = claims["iat"]
    nonce = claims.get("nonce")
    if nonce is not None and (not isinstance(nonce, str) or len(nonce) > _MAX_CLAIM):
        raise DpopMalformedError("claim nonce is not a string of bounded length")
    # 5. Bound to this request.
    if sid != session_id:
        raise DpopSessionMismatchError("the proof was made for another session")
    if htm != method.upper():
        raise DpopMethodMismatchError("the proof was made for another HTTP method")
    if htu != url and normalize_url(htu) != normalize_url(url):
        raise DpopUrlMismatchError("the proof was made for another URL")
    if bh != body_hash(body):
        raise DpopBodyMismatchError("the proof's body hash does not match the body")
    if api_key is not None and claims.get("ath") != ath_of(api_key):
        raise DpopAthMismatchError("the proof was made for another API key")
    # 6. Fresh.
    t = int(now.timestamp())
    if iat < t - max_age_seconds or iat > t + skew_seconds:
        raise DpopStaleError("the proof's iat is outside the freshness window")
    return VerifiedProof(jkt=jkt, jti=jti, iat=iat, session_id=sid, htm=htm, htu=htu,
                         nonce=nonce)


def verify_signature(
    proof: str, jkt: str, keys: KeyCache | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Checks 0-4 of :func:`verify_proof`: a well-formed proof signed by the key ``jkt``.

    Returns the header's ``jwk`` and the claims; checks only that ``jti``, ``htm``, ``htu``
    and ``iat`` are present with their types (the RFC 9449 claims), not their values.
    """
    jwk, claims, signature = _prepare(proof, jkt, keys)
    require_signature(signature, keys)
    return jwk, claims


def _prepare(
    proof: str, jkt: str, keys: KeyCache | None
) -> tuple[dict[str, Any], dict[str, Any], ProofSignature]:
    # Checks 0-3, and check 4 made ready to run.
    # 0. One compact JWS, bounded.
    if len(proof) > MAX_PROOF_CHARS or not proof.isascii() or proof.count(".") != 2:
        raise DpopMalformedError("the DPoP header is not one compact JWS of bounded size")
    head_b64, claims_b64, sig_b64 = proof.split(".")
    # 1. Header: type, the one allowed algorithm, a public P-256 key (or the same header,
    #    byte for byte, as a proof that verified before).
    cached = keys.lookup(head_b64) if keys is not None else None
    jwk = cached.jwk if cached is not None else _header_jwk(head_b64)
    # 2. Claims present, with their types.
    claims = _json_object(claims_b64, "proof claims")
    for name in _REQUIRED:
        _claim(claims, name)
    iat = claims.get("iat")
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise DpopMalformedError("claim iat is missing or not an integer")
    # 3. The key is the session's key.
    thumbprint = cached.jkt if cached is not None else jwk_thumbprint(jwk)
    if thumbprint != jkt:  # both public: the key's thumbprint
        raise DpopKeyMismatchError("the proof is not signed by this session's key")
    # 4. The signature over exactly the received bytes, raw r || s.
    signature = _unb64url(sig_b64, "proof signature")
    if len(signature) != 64:
        raise DpopSignatureInvalidError("an ES256 signature is 64 bytes (r || s)")
    fresh: _Header | None = None
    if cached is not None:
        entry = cached
    else:
        key, point = _p256_key(jwk)
        entry = fresh = _Header(jwk=jwk, jkt=thumbprint, key=key, point=point)
    return jwk, claims, ProofSignature(
        key=entry.key, point=entry.point, raw=signature,
        message=proof[:len(proof) - len(sig_b64) - 1].encode("ascii"), head_b64=head_b64,
        fresh_header=fresh)


def _raw_to_der(signature: bytes) -> bytes:
    # ASN.1 DER of ECDSA-Sig-Value {r, s} from the 64-byte raw form (what
    # encode_dss_signature makes from the two integers, without converting them): each a
    # minimal big-endian INTEGER, with a 0x00 prefix when its top bit is set.  At most
    # 2 * (2 + 33) = 70 bytes, so every length fits one byte.
    r = _der_integer(signature[:32])
    s = _der_integer(signature[32:])
    return b"\x30" + bytes((len(r) + len(s),)) + r + s


def _der_integer(value: bytes) -> bytes:
    value = value.lstrip(b"\x00") or b"\x00"
    if value[0] & 0x80:
        value = b"\x00" + value
    return b"\x02" + bytes((len(value),)) + value


def _header_jwk(head_b64: str) -> dict[str, Any]:
    # Check 1 of verify_proof; returns the header's public key.
    header = _json_object(head_b64, "proof header")
    if header.get("typ") != TYP or "crit" in header:
        raise DpopMalformedError("proof header typ must be dpop+jwt, without crit")
    if header.get("alg") != ALG:
        raise DpopMalformedError("proof alg must be ES256")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
        raise DpopMalformedError("proof jwk must be a P-256 EC public key")
    if _PRIVATE_MEMBERS & jwk.keys():
        raise DpopMalformedError("proof jwk must not contain private key material")
    return jwk
