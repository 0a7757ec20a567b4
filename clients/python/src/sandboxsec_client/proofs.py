"""Session proofs (``DPoP``, RFC 9449) signed by the sandbox's session key.

A session started from an attestation that certified a TPM-held session key is bound to that
key: every request acting in the session carries a ``DPoP`` header, a compact JWS signed by
the key.  This module makes those proofs, byte for byte as the service checks them
(``docs/api.md``, "Session proofs"):

- header ``{"typ": "dpop+jwt", "alg": "ES256", "jwk": {"crv", "kty", "x", "y"}}``;
- claims ``jti`` (unique), ``htm`` (method), ``htu`` (URL without query, normalised),
  ``iat`` (seconds), ``sid`` (the session), ``bh`` (base64url SHA-256 of the exact body
  bytes), ``ath`` (base64url SHA-256 of the API key sent with it), and ``nonce``: the last
  ``DPoP-Nonce`` the service sent, when it sent one (RFC 9449 section 8);
- signature: ES256, raw ``r || s`` (64 bytes).

What signs is pluggable (:class:`SessionKeySigner`): the sandbox's TPM
(:class:`sandboxsec_client.tpm.TpmSessionKey`, the ``tpm`` extra) in production, or
:class:`SoftwareP256Signer`, a key in process memory, for tests and development only.
:class:`SessionProver` is the ``proof=`` hook the clients call for every request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

__all__ = [
    "InsecureSignerWarning",
    "SessionKeySigner",
    "SessionProver",
    "SoftwareP256Signer",
    "create_proof",
    "jwk_thumbprint",
    "normalize_url",
    "session_key_jwk",
]

TYP: Final = "dpop+jwt"
ALG: Final = "ES256"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_ALG_ECC: Final = 0x0023
_ALG_NULL: Final = 0x0010
_CURVE_P256: Final = 0x0003


class InsecureSignerWarning(UserWarning):
    """A session key in process memory: the session is not bound to any TPM."""


@runtime_checkable
class SessionKeySigner(Protocol):
    """The session key as the prover needs it: its public JWK and an ES256 signature."""

    @property
    def jwk(self) -> Mapping[str, str]:
        """The public key: ``{"crv": "P-256", "kty": "EC", "x", "y"}`` (base64url, 32 bytes
        each)."""
        ...

    def sign(self, message: bytes) -> bytes:
        """ECDSA P-256 over SHA-256(``message``): raw ``r || s``, each left-padded to 32
        bytes (64 bytes in all)."""
        ...


def b64url(data: bytes) -> str:
    """Unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def ec_jwk(x: bytes, y: bytes) -> dict[str, str]:
    """The public JWK of a P-256 point (coordinates left-padded to 32 bytes)."""
    return {"crv": "P-256", "kty": "EC", "x": b64url(x.rjust(32, b"\0")),
            "y": b64url(y.rjust(32, b"\0"))}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 SHA-256 thumbprint of a P-256 JWK (what the token's ``cnf.jkt`` names)."""
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    data = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("utf-8")
    return b64url(hashlib.sha256(data).digest())


def der_to_raw(der: bytes) -> bytes:
    """An ASN.1 DER ECDSA signature as JWS wants it: ``r || s``, 32 bytes each."""
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def normalize_url(url: str) -> str:
    """``scheme://host[:port]/path``: lower-cased scheme and host, default port dropped,
    query and fragment removed (RFC 9449 section 4.3)."""
    parts = urlsplit(url)
    scheme, host, port = parts.scheme.lower(), (parts.hostname or "").lower(), parts.port
    if scheme not in _DEFAULT_PORTS or not host or parts.username or parts.password:
        raise ValueError("htu must be an http(s) URL with a host and no user info")
    shown = f"[{host}]" if ":" in host else host
    netloc = shown if port in (None, _DEFAULT_PORTS[scheme]) else f"{shown}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def create_proof(sign: Callable[[bytes], bytes], jwk: Mapping[str, str], *, method: str,
                 url: str, session_id: str, body: bytes, iat: int,
                 api_key: str | None = None, jti: str | None = None,
                 nonce: str | None = None) -> str:
    """The ``DPoP`` header value for one request, signed by ``sign`` (the session key).

    ``url`` is the URL the service is reached at (query and fragment are dropped); ``body``
    the exact bytes sent (``b""`` for none); ``api_key`` the bearer key sent with it;
    ``nonce`` the last ``DPoP-Nonce`` the service sent, if any (the ``nonce`` claim).
    """
    header = {"typ": TYP, "alg": ALG, "jwk": {k: jwk[k] for k in ("crv", "kty", "x", "y")}}
    claims: dict[str, Any] = {
        "jti": jti or b64url(secrets.token_bytes(18)),
        "htm": method.upper(),
        "htu": normalize_url(url),
        "iat": iat,
        "sid": session_id,
        "bh": b64url(hashlib.sha256(body).digest()),
    }
    if api_key is not None:
        claims["ath"] = b64url(hashlib.sha256(api_key.encode("utf-8")).digest())
    if nonce is not None:
        claims["nonce"] = nonce
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    signature = sign(signing_input.encode("ascii"))
    if len(signature) != 64:
        raise ValueError("an ES256 signer must return 64 bytes (r || s)")
    return signing_input + "." + b64url(signature)


def session_key_jwk(tpm2b_public: bytes) -> dict[str, str]:
    """The public JWK of a session key given as its marshalled ``TPM2B_PUBLIC`` (an ECC P-256
    key, as the sandbox's TPM returns it); ``ValueError`` for anything else.

    Only reads the point: whether the key is one the TPM never exports is the service's check
    (it verifies the AK's ``TPM2_Certify`` and the attributes).
    """
    at = 0

    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(tpm2b_public):
            raise ValueError("TPM2B_PUBLIC is truncated")
        out = tpm2b_public[at:at + n]
        at += n
        return out

    def u16() -> int:
        return int.from_bytes(take(2), "big")

    if u16() != len(tpm2b_public) - 2:
        raise ValueError("TPM2B_PUBLIC size prefix does not match its length")
    key_type, _name_alg = u16(), u16()
    take(4)            # objectAttributes
    take(u16())        # authPolicy
    if key_type != _ALG_ECC:
        raise ValueError("the session key must be an ECC key")
    if u16() != _ALG_NULL:   # symmetric: a signing key has none
        raise ValueError("the session key must not be a storage key")
    if u16() != _ALG_NULL:   # scheme and its hash
        take(2)
    if u16() != _CURVE_P256:
        raise ValueError("the session key must be on P-256")
    if u16() != _ALG_NULL:   # kdf and its hash
        take(2)
    x, y = take(u16()), take(u16())
    if at != len(tpm2b_public) or not 0 < len(x) <= 32 or not 0 < len(y) <= 32:
        raise ValueError("TPM2B_PUBLIC has a malformed point or trailing bytes")
    return ec_jwk(x, y)


class SoftwareP256Signer:
    """A P-256 key in this process's memory: FOR TESTS AND DEVELOPMENT ONLY.

    Anyone who reads the process's memory can sign for the session, so a session bound to it
    is not bound to the sandbox; the service only accepts such a key when its certify was
    made by an AK it trusts, which a real TPM's AK never does for a key it does not hold.
    Constructing one warns with :class:`InsecureSignerWarning`.
    """

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        warnings.warn("SoftwareP256Signer keeps the session key in memory: tests and "
                      "development only", InsecureSignerWarning, stacklevel=2)
        self.private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        n = self.private_key.public_key().public_numbers()
        self._jwk = ec_jwk(n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big"))

    @property
    def jwk(self) -> Mapping[str, str]:
        """The public JWK."""
        return dict(self._jwk)

    def sign(self, message: bytes) -> bytes:
        """ES256 over ``message``, raw ``r || s``."""
        return der_to_raw(self.private_key.sign(message, ec.ECDSA(hashes.SHA256())))


def _token_jti(token: object) -> str | None:
    # The attestation id a session start proves for; the service verifies the token itself.
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, RecursionError):
        return None
    jti = claims.get("jti") if isinstance(claims, dict) else None
    return jti if isinstance(jti, str) else None


class SessionProver:
    """The clients' ``proof=`` hook: a ``DPoP`` proof by the session key for each request that
    acts in a session, no header for the others (or while no key is attached).

    The session a request acts in is read from the request itself: the path
    (``/v1/sessions/{id}/...``), the JSON body's ``session_id``, the attestation id of the
    token when starting a session, and :attr:`session_id` (the session started last, or the
    one given) for approval reads, which name none.

    ``htu_base``: the service's URL as it is configured, when this client reaches it through
    something that changes scheme, host or port (a local TCP forwarder); proofs name the
    service's own URL.  ``now`` returns seconds since the epoch (``time.time``).

    :attr:`nonce` is the last ``DPoP-Nonce`` the service sent (RFC 9449 section 8): the
    transports store every one they see here, and each proof carries it.  It is opaque: the
    service alone checks it.
    """

    def __init__(self, api_key: str | None, signer: SessionKeySigner | None = None, *,
                 session_id: str | None = None, htu_base: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self._api_key = api_key
        self.signer = signer
        self.session_id = session_id
        self._htu_base = urlsplit(htu_base) if htu_base else None
        self.now = now
        self.nonce: str | None = None

    def attach(self, signer: SessionKeySigner, session_id: str | None = None) -> None:
        """Sign with ``signer`` from now on (for ``session_id`` when given)."""
        self.signer = signer
        if session_id is not None:
            self.session_id = session_id

    def share(self, other: SessionProver) -> None:
        """Prove with ``other``'s key, session and server nonce (another worker of the same
        agent)."""
        self.signer, self.session_id = other.signer, other.session_id
        self.nonce = other.nonce

    def session_of(self, method: str, url: str, body: bytes) -> str | None:
        """The session a request acts in, or ``None``."""
        path = urlsplit(url).path
        if path.startswith("/v1/sessions/"):
            sid = unquote(path[len("/v1/sessions/"):].split("/", 1)[0])
            return sid or None
        doc: Any = None
        if body:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                doc = None
        if path == "/v1/sessions" and method.upper() == "POST" and isinstance(doc, dict):
            return _token_jti(doc.get("attestation_token"))
        if isinstance(doc, dict) and isinstance(doc.get("session_id"), str):
            return str(doc["session_id"])
        if path.startswith("/v1/approvals"):
            return self.session_id
        return None

    def __call__(self, method: str, url: str, body: bytes) -> str | None:
        signer = self.signer
        if signer is None:
            return None
        sid = self.session_of(method, url, body)
        if sid is None:
            return None
        if self._htu_base is not None:
            base, parts = self._htu_base, urlsplit(url)
            url = parts._replace(scheme=base.scheme, netloc=base.netloc).geturl()
        return create_proof(signer.sign, signer.jwk, method=method, url=url, session_id=sid,
                            body=body, iat=int(self.now()), api_key=self._api_key,
                            nonce=self.nonce)
