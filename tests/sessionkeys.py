"""Session keys for tests: software P-256 keys that stand in for the TPM-held key, and an
``httpx.Auth`` that signs a session proof (``DPoP``) for every request acting in a session.

The product verifies proofs the same way whatever holds the key; tests that are about the
TPM (certify, attributes, the second-key refusal) use swtpm in
``tests/integration/sessions/``.  Sessions inserted directly by test set-up get a key from
:func:`new_key` and are registered here, so API tests keep calling the routes as before.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxsec.sessions import dpop

__all__ = ["KEYS", "ProofAuth", "SoftSessionKey", "new_key"]


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


#: Session id -> the key its row was bound to (filled by the test helpers that make sessions).
KEYS: dict[str, SoftSessionKey] = {}


def new_key(session_id: str) -> SoftSessionKey:
    """A fresh key registered for ``session_id``; put its ``jkt`` in the session row."""
    key = SoftSessionKey()
    KEYS[session_id] = key
    return key


_SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)/")


class ProofAuth(httpx.Auth):
    """Adds a ``DPoP`` proof to requests that name a registered session: in the JSON body
    (``session_id``), in the path (``/v1/sessions/{id}/...``), or for approval reads, the
    session of the last request that named one.  A request that already has a ``DPoP``
    header, or names no registered session, is sent as it is."""

    requires_request_body = True

    def __init__(self, now: Callable[[], datetime]) -> None:
        self._now = now
        self.last: str | None = None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if "dpop" not in request.headers:
            sid = self._session_of(request)
            if sid is not None and sid in KEYS:
                self.last = sid
                auth = request.headers.get("authorization", "")
                api_key = auth[7:] if auth.lower().startswith("bearer ") else None
                url = str(request.url.copy_with(query=None))
                request.headers["DPoP"] = KEYS[sid].proof(
                    request.method, url, sid, request.content, self._now(), api_key)
        yield request

    def _session_of(self, request: httpx.Request) -> str | None:
        path = request.url.path
        m = _SESSION_PATH.match(path + "/")
        if m is not None:
            return m.group(1)
        if request.content and request.headers.get("content-type", "").startswith(
                "application/json"):
            try:
                body = json.loads(request.content)
            except (ValueError, RecursionError):
                body = None
            if isinstance(body, dict) and isinstance(body.get("session_id"), str):
                return str(body["session_id"])
        if path.startswith("/v1/approvals"):
            sid = request.url.params.get("session_id")
            return sid if sid is not None else self.last
        return None
