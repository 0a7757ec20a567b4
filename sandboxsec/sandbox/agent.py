"""The reference sandbox's agent client: the ``sandboxsec-client`` agent with a session key.

The client distribution (:mod:`sandboxsec_client`, ``docs/clients.md``) speaks the API and
takes a ``DPoP`` proof signer through its ``proof=`` hook; it does not know TPMs.  This module
supplies that signer for the reference sandbox: :class:`SessionProver` signs each request
that acts in a session with the TPM-held session key (:mod:`sandboxsec.sessions.dpop`), and
:class:`AgentClient` fills it in when it attests (the key the AK certified) and starts a
session.  ``from sandboxsec.sandbox.agent import AgentClient`` keeps working.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from typing import Any, Final

import httpx
from sandboxsec_client import (
    AgentClient as _ClientAgent,
)
from sandboxsec_client import (
    ApiError,
    Approval,
    Attester,
    Decision,
    GrantCheck,
    RetryPolicy,
    SessionInfo,
    SessionKeyAttester,
    Verdict,
)

from sandboxsec.attestation.certify import parse_session_key
from sandboxsec.clock import Clock, SystemClock
from sandboxsec.sessions import dpop

__all__ = [
    "AgentClient",
    "ApiError",
    "Approval",
    "Attester",
    "Decision",
    "GrantCheck",
    "SessionInfo",
    "SessionKeyAttester",
    "SessionProver",
    "Verdict",
]

_SESSION_PATH: Final = re.compile(r"^/v1/sessions/([^/?#]+)/")


def _claims(token: object) -> dict[str, Any]:
    # Only to name the attestation id (``sid``) of a session start; the service verifies.
    if not isinstance(token, str) or token.count(".") != 2:
        return {}
    try:
        part = token.split(".")[1]
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


class SessionProver:
    """A ``proof=`` signer: a ``DPoP`` proof by the session key for each request acting in a
    session, ``None`` (no header) for the others or while no key is attached.

    The proof's session (``sid``) is read from the request: the path
    (``/v1/sessions/{id}/...``), the body's ``session_id``, the attestation id of the token
    when starting a session, and for approval reads the session started last.
    """

    def __init__(self, api_key: str | None, clock: Clock | None = None) -> None:
        self._api_key = api_key
        self._clock: Clock = clock or SystemClock()
        self.signer: dpop.Signer | None = None
        self.jwk: dict[str, str] | None = None
        self.session_id: str | None = None

    def attach(self, signer: dpop.Signer, jwk: Mapping[str, str]) -> None:
        """Sign with ``signer`` whose public key is ``jwk`` from now on."""
        self.signer, self.jwk = signer, dict(jwk)

    def share(self, other: SessionProver) -> None:
        """Prove with ``other``'s key and session (another worker of the same agent)."""
        self.signer, self.jwk, self.session_id = other.signer, other.jwk, other.session_id

    def session_of(self, method: str, url: str, body: bytes) -> str | None:
        """The session a request acts in, or ``None``."""
        path = httpx.URL(url).path
        m = _SESSION_PATH.match(path + "/")
        if m is not None:
            return m.group(1)
        doc: Any = None
        if body:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):
                doc = None
        if path == "/v1/sessions" and method == "POST" and isinstance(doc, dict):
            jti = _claims(doc.get("attestation_token")).get("jti")
            return jti if isinstance(jti, str) else None
        if isinstance(doc, dict) and isinstance(doc.get("session_id"), str):
            return str(doc["session_id"])
        if path.startswith("/v1/approvals/"):
            return self.session_id
        return None

    def __call__(self, method: str, url: str, body: bytes) -> str | None:
        if self.signer is None or self.jwk is None:
            return None
        sid = self.session_of(method, url, body)
        if sid is None:
            return None
        return dpop.create_proof(self.signer, self.jwk, method=method, url=url,
                                 session_id=sid, body=body, now=self._clock.now(),
                                 api_key=self._api_key)


class AgentClient(_ClientAgent):
    """The client's :class:`sandboxsec_client.AgentClient` whose session calls carry proofs
    by the TPM-held session key it had certified when attesting."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, http: httpx.Client | None = None,
                 clock: Clock | None = None) -> None:
        self.prover = SessionProver(api_key, clock)
        super().__init__(base_url, api_key, timeout=timeout, retry=retry, proof=self.prover,
                         http=http)

    def attest(self, tpm: Attester, manifest: bytes) -> Verdict:
        """Challenge, quote, certify a fresh session key, verify; then sign with that key."""
        verdict = super().attest(tpm, manifest)
        public = getattr(tpm, "session_key_public", None)
        sign = getattr(tpm, "sign_session", None)
        if isinstance(tpm, SessionKeyAttester) and isinstance(public, bytes) and sign:
            self.prover.attach(sign, parse_session_key(public).jwk)
        return verdict

    def start_session(self, attestation_token: str) -> SessionInfo:
        """A session from an affirming token; approval reads then prove for it."""
        session = super().start_session(attestation_token)
        self.prover.session_id = session.session_id
        return session

    def use_session(self, other: AgentClient) -> None:
        """Prove with ``other``'s session key and session (another worker of one agent)."""
        self.prover.share(other.prover)
