"""Agent sessions: started only from an affirming attestation token of the same tenant.

A token starts at most one session (its verdict is claimed atomically), and the session
records the image and AK it was attested on.  Starts and refusals are audited; when the audit
log cannot write, no session starts.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from sandboxsec.attestation.errors import (
    SessionTokenRequiredError,
    TokenNotAffirmingError,
    TokenReusedError,
)
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.sessions.binding import RequestProof
from sandboxsec.sessions.errors import SessionKeyRequiredError
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.tenancy import get_scoped

if TYPE_CHECKING:
    from sandboxsec.services import Services

__all__ = ["SessionService"]


class SessionService:
    """Start and read agent sessions."""

    def __init__(self, services: Services) -> None:
        self._s = services

    def start(self, who: Principal, attestation_token: str,
              proof: RequestProof | None = None) -> AgentSession:
        """Start a session on an affirming, unexpired, unused token of ``who``'s tenant.

        Checks, in order: a token is present; its signature, expiry and tenant verify; its
        status is affirming; it names a certified session key (``cnf.jkt``, unless
        ``require_session_key`` is off) and ``proof`` is a session proof by that key whose
        ``sid`` is the token's attestation id; its verdict was not used by another session.
        Each refusal raises its own reason code and is audited.
        """
        now = self._s.clock.now()
        try:
            # 1-3. The token itself.
            if not attestation_token:
                raise SessionTokenRequiredError("an attestation token is required")
            claims = self._s.attestation.verify_token(attestation_token, tenant_id=who.tenant_id)
            if claims.status != "affirming":
                raise TokenNotAffirmingError("the attestation was not affirming")
            # 3b. The session key: the request proves it holds the certified key.
            if claims.jkt is None:
                if self._s.settings.require_session_key:
                    raise SessionKeyRequiredError("the token names no certified session key")
            else:
                self._s.session_binding.check_proof(
                    who, proof, session_id=claims.attestation_id, jkt=claims.jkt, now=now)
            # 4. Claim the verdict and create the session in one transaction.
            session_id = new_id("ses")
            expires = now + timedelta(seconds=self._s.settings.session_ttl_seconds)
            with self._s.db.session() as s:
                if not self._s.attestation.claim_for_session(
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
        except SandboxSecError as exc:
            if exc.status < 500:
                self._audit(who, AuditEvent.SESSION_REFUSE, "failure", exc.reason, {}, {})
            raise
        return row

    def get(self, who: Principal, session_id: str) -> AgentSession:
        """The session ``session_id`` of ``who``'s tenant (404 for any other)."""
        with self._s.db.session() as s:
            return get_scoped(s, AgentSession, who.tenant_id, session_id, what="session")

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
        self._s.audit.append(
            AuditRecord.by(who, event, outcome, reason=reason, object_ids=object_ids,
                           body=body),
            session=session,
        )
