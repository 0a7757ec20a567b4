"""Agent sessions: started only from an affirming attestation token of the same tenant.

A token starts at most one session (its verdict is claimed atomically), and the session
records the image and AK it was attested on.  Starts and refusals are audited; when the audit
log cannot write, no session starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlmodel import Session

from sandboxsec.attestation.errors import (
    SessionTokenRequiredError,
    TokenNotAffirmingError,
    TokenReusedError,
)
from sandboxsec.attestation.token import TokenClaims
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError, is_refusal
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.sessions.binding import RequestProof
from sandboxsec.sessions.errors import DpopMissingError, SessionKeyRequiredError
from sandboxsec.sessions.models import AgentSession
from sandboxsec.sessions.views import SessionView
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped

__all__ = ["ProofChecker", "SessionConfig", "SessionService", "TokenVerifier", "VerdictClaimer"]


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How long a session lives."""

    ttl_seconds: int
    #: Only tokens naming a certified TPM-held session key start sessions.
    require_session_key: bool = True


class TokenVerifier(Protocol):
    """Verifies an attestation token of a tenant (the attestation service does)."""

    def verify_token(self, presented: str, *, tenant_id: str) -> TokenClaims:
        """The token's claims, or a refusal with its own reason code."""
        ...

    def check_standing(self, tenant_id: str, ak_name: str, image_digest: str) -> None:
        """Raise when what the token was issued on has been revoked since (EK, image)."""
        ...


class VerdictClaimer(Protocol):
    """Marks an attestation verdict used by one session, in the caller's transaction."""

    def claim_for_session(
        self, s: Session, tenant_id: str, attestation_id: str, session_id: str
    ) -> bool:
        """False when the verdict is unknown, not affirming or used already."""
        ...


class ProofChecker(Protocol):
    """Checks the session proof of a request and claims its id once (the session binding)."""

    def check_proof(self, who: Principal, request: RequestProof | None, *, session_id: str,
                    jkt: str, now: datetime) -> object:
        """Return when the proof verifies and was never used; else raise its refusal."""
        ...


class SessionService:
    """Start and read agent sessions."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink, tokens: TokenVerifier,
                 verdicts: VerdictClaimer, config: SessionConfig, *,
                 proofs: ProofChecker | None = None) -> None:
        self._db = db
        self._clock = clock
        self._audit_sink = audit
        self._tokens = tokens
        self._verdicts = verdicts
        self._config = config
        self._proofs = proofs

    def start(self, who: Principal, attestation_token: str,
              proof: RequestProof | None = None) -> SessionView:
        """Start a session on an affirming, unexpired, unused token of ``who``'s tenant.

        Checks, in order: a token is present; its signature, expiry and tenant verify; its
        status is affirming; it names a certified session key (``cnf.jkt``, unless
        ``require_session_key`` is off) and ``proof`` is a session proof by that key whose
        ``sid`` is the token's attestation id; its verdict was not used by another session.
        Each refusal raises its own reason code and is audited.
        """
        now = self._clock.now()
        try:
            # 1-3. The token itself.
            if not attestation_token:
                raise SessionTokenRequiredError("an attestation token is required")
            claims = self._tokens.verify_token(attestation_token, tenant_id=who.tenant_id)
            if claims.status != "affirming":
                raise TokenNotAffirmingError("the attestation was not affirming")
            # A revocation since the token was issued (EK chain, image) stops the session.
            self._tokens.check_standing(who.tenant_id, claims.ak_name, claims.image_digest)
            # 3b. The session key: the request proves it holds the certified key.
            if claims.jkt is None:
                if self._config.require_session_key:
                    raise SessionKeyRequiredError("the token names no certified session key")
            elif self._proofs is None:
                raise DpopMissingError("no session proof can be checked here")
            else:
                self._proofs.check_proof(
                    who, proof, session_id=claims.attestation_id, jkt=claims.jkt, now=now)
            # 4. Claim the verdict and create the session in one transaction.
            session_id = new_id("ses")
            expires = now + timedelta(seconds=self._config.ttl_seconds)
            with self._db.session() as s:
                if not self._verdicts.claim_for_session(
                    s, who.tenant_id, claims.attestation_id, session_id
                ):
                    raise TokenReusedError("this attestation token already started a session")
                row = AgentSession(
                    id=session_id,
                    tenant_id=who.tenant_id,
                    image_name=claims.image_name,
                    image_digest=claims.image_digest,
                    ak_name=claims.ak_name,
                    attested=True,
                    attestation_id=claims.attestation_id,
                    key_thumbprint=claims.jkt,
                    created_by=who.key_id,
                    created_at=now,
                    expires_at=expires,
                )
                s.add(row)
                self._audit(
                    who, AuditEvent.SESSION_START, "success", None,
                    {"session_id": session_id, "attestation_id": claims.attestation_id,
                     "ak_name": claims.ak_name},
                    {"image_digest": claims.image_digest, "image_name": claims.image_name},
                    session=s,
                )
                view = SessionView.of(row)
        except SandboxSecError as exc:
            if is_refusal(exc):
                self._audit(who, AuditEvent.SESSION_REFUSE, "failure", exc.reason, {}, {})
            raise
        return view

    def get(self, who: Principal, session_id: str) -> SessionView:
        """The session ``session_id`` of ``who``'s tenant (404 for any other)."""
        with self._db.session() as s:
            return SessionView.of(
                get_scoped(s, AgentSession, who.tenant_id, session_id, what="session"))

    def _audit(
        self,
        who: Principal,
        event: AuditEvent,
        outcome: str,
        reason: str | None,
        object_ids: dict[str, str],
        body: dict[str, str],
        *,
        session: object | None = None,
    ) -> None:
        self._audit_sink.append(
            AuditRecord.by(who, event, outcome, reason=reason, object_ids=object_ids,
                           body=body),
            session=session,
        )
