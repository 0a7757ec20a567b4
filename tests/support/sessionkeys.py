"""Session keys for tests: software P-256 keys that stand in for the TPM-held key, and an
``httpx.Auth`` that signs a session proof (``DPoP``) for every request acting in a session.

The product verifies proofs the same way whatever holds the key; tests that are about the
TPM (certify, attributes, the second-key refusal) use swtpm in
``tests/integration/sessions/``.  Sessions inserted directly by test set-up get a key from
:func:`new_key` and are registered here, so API tests keep calling the routes as before.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxsec.sessions import dpop

__all__ = ["BY_JKT", "KEYS", "ProofAuth", "RegistryProof", "SoftSessionKey", "new_key",
           "register"]


@dataclass
class SoftSessionKey:
    """A software ES256 key with the signer shape the product's proof code takes."""

    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def jwk(self) -> dict[str, str]:
        n = self.private.public_key().public_numbers()
        return dpop.ec_jwk(n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big"))

    @property
    def jkt(self) -> str:
        return dpop.jwk_thumbprint(self.jwk)

    def sign(self, message: bytes) -> bytes:
        return dpop.der_to_raw(self.private.sign(message, ec.ECDSA(hashes.SHA256())))

    def proof(self, method: str, url: str, session_id: str, body: bytes, now: datetime,
              api_key: str | None, **over: str) -> str:
        return dpop.create_proof(self.sign, self.jwk, method=method, url=url,
                                 session_id=session_id, body=body, now=now, api_key=api_key,
                                 **over)  # type: ignore[arg-type]


#: Session id -> the key its row was bound to (filled by the test helpers that make sessions,
#: and by :class:`ProofAuth` when a session starts from a token naming a registered key).
KEYS: dict[str, SoftSessionKey] = {}
#: Key thumbprint -> key, for keys sent as session keys in test evidence.
BY_JKT: dict[str, SoftSessionKey] = {}


def register() -> SoftSessionKey:
    """A fresh key, findable by its thumbprint (for session starts)."""
    key = SoftSessionKey()
    BY_JKT[key.jkt] = key
    return key


def new_key(session_id: str) -> SoftSessionKey:
    """A fresh key registered for ``session_id``; put its ``jkt`` in the session row."""
    key = register()
    KEYS[session_id] = key
    return key


def _token_claims(token: object) -> dict[str, object]:
    if not isinstance(token, str) or token.count(".") != 2:
        return {}
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)/")


class ProofAuth(httpx.Auth):
    """Adds a ``DPoP`` proof to requests that name a registered session: in the JSON body
    (``session_id``), in the path (``/v1/sessions/{id}/...``), or for approval reads, the
    session of the last request that named one.  A request that already has a ``DPoP``
    header, or names no registered session, is sent as it is."""

    requires_request_body = True
    requires_response_body = True

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self.last: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        starting: SoftSessionKey | None = None
        if "dpop" not in request.headers:
            sid, key = self._session_of(request)
            if sid is not None and key is not None:
                self.last = sid
                starting = key if request.url.path == "/v1/sessions" else None
                auth = request.headers.get("authorization", "")
                api_key = auth[7:] if auth.lower().startswith("bearer ") else None
                url = str(request.url.copy_with(query=None))
                request.headers["DPoP"] = key.proof(
                    request.method, url, sid, request.content, self._now(), api_key)
        response = yield request
        if starting is not None and response.status_code == 201:
            KEYS[str(response.json()["session_id"])] = starting

    def _session_of(self, request: httpx.Request) -> tuple[str | None, SoftSessionKey | None]:
        json_body = request.headers.get("content-type", "").startswith("application/json")
        return _session_of(request.url, request.content if json_body else b"", self.last)


class RegistryProof:
    """The client's ``proof=`` hook over the same registry: a proof by the registered key of
    the session a request names (as :class:`ProofAuth` finds it), ``None`` for the others."""

    def __init__(self, api_key: str | None, now: Callable[[], datetime],
                 session_id: str | None = None, external_url: str | None = None) -> None:
        self._api_key = api_key
        self._now = now
        # The service's URL as it is configured (a TCP proxy in between changes the port).
        self._external = httpx.URL(external_url) if external_url else None
        self.last: str | None = session_id  # approval reads name no session: this one

    def __call__(self, method: str, url: str, body: bytes) -> str | None:
        sid, key = _session_of(httpx.URL(url), body, self.last)
        if sid is None or key is None:
            return None
        if sid in KEYS:  # not a session start (its sid is the attestation id)
            self.last = sid
        if self._external is not None:
            url = str(httpx.URL(url).copy_with(scheme=self._external.scheme,
                                               host=self._external.host,
                                               port=self._external.port))
        return key.proof(method, url, sid, body, self._now(), self._api_key)


def _session_of(url: httpx.URL, content: bytes,
                last: str | None) -> tuple[str | None, SoftSessionKey | None]:
    path = url.path
    m = _SESSION_PATH.match(path + "/")
    body: object = None
    if content:
        try:
            body = json.loads(content)
        except (ValueError, RecursionError):
            body = None
    sid: str | None = None
    if m is not None:
        sid = m.group(1)
    elif path == "/v1/sessions" and isinstance(body, dict):
        # Starting a session: the proof names the attestation id, by the token's key.
        claims = _token_claims(body.get("attestation_token"))
        cnf = claims.get("cnf")
        jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
        if isinstance(jkt, str) and jkt in BY_JKT:
            return str(claims.get("jti")), BY_JKT[jkt]
    elif isinstance(body, dict) and isinstance(body.get("session_id"), str):
        sid = str(body["session_id"])
    elif path.startswith("/v1/approvals"):
        sid = url.params.get("session_id") or last
    return sid, KEYS.get(sid) if sid is not None else None


def proof_auth_for(client: object, now: Callable[[], datetime]) -> object:
    """A :class:`ProofAuth` for ``client``: Starlette's test client is built on ``httpx2``
    when that is installed (the MCP SDK brings it), whose ``auth`` must be its own kind."""
    try:
        import httpx2
    except ImportError:
        return ProofAuth(now)
    if not isinstance(client, httpx2.Client):
        return ProofAuth(now)

    class _ProofAuth2(httpx2.Auth):  # type: ignore[misc]
        requires_request_body = True
        requires_response_body = True
        __init__ = ProofAuth.__init__
        auth_flow = ProofAuth.auth_flow
        _session_of = ProofAuth._session_of

    return _ProofAuth2(now)
