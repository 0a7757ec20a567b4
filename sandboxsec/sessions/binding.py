"""Sessions bound to the sandbox's TPM-held key: every request in a session proves it.

:class:`SessionBinding` is the adapter between the pure proof verifier
(:mod:`sandboxsec.sessions.dpop`), the session rows, the replay store and the audit log.
A route that acts in a session calls :meth:`SessionBinding.require` with the session id it
acts on *before* it acts; the checks, in order:

1. exactly one ``DPoP`` header (none: ``dpop_proof_missing``);
2. the session is this tenant's (else 404, as for any other tenant's object), not ended
   (``session_ended``) and not expired (``session_expired``);
3. the session has a key (``session_not_bound``; only ``require_session_key=false`` lets an
   unbound session act, as a bearer handle);
4. the proof verifies for this request: key, signature, session, method, URL (against the
   configured external URL, never what a proxy or the Host header says), body, API key,
   freshness (:func:`sandboxsec.sessions.dpop.verify_proof`), and, where the deployment
   requires them, the server nonce (:mod:`sandboxsec.sessions.nonce`);
5. its ``jti`` was never used with this key, in any worker (``dpop_replayed``).

Refusals after step 2 are audited (``session:proof:refuse`` with the reason code).

Routes that write (``POST /v1/actions``, trajectory writes) call :meth:`SessionBinding.acting`
instead: checks 1, 3 and 4 first without a write, and step 5 inside the route's own
transaction, so the proof is used up exactly when the request is carried out.  With
``overlap=True`` (``POST /v1/actions``) the signature of step 4 is checked on a thread of its
own while the route works, and step 5 waits for it, inside the transaction: a forged proof's
work is rolled back and refused with ``dpop_signature_invalid``
(:mod:`sandboxsec.sessions.signatures`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Table, select, update
from sqlmodel import Session

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import NotFoundError, SandboxSecError, is_refusal
from sandboxsec.principal import Principal
from sandboxsec.sessions import dpop
from sandboxsec.sessions.errors import (
    DpopError,
    DpopMalformedError,
    DpopMissingError,
    DpopReplayedError,
    DpopUrlUnconfiguredError,
    SessionEndedError,
    SessionExpiredError,
    SessionNotBoundError,
)
from sandboxsec.sessions.liveness import is_live
from sandboxsec.sessions.lru import Lru
from sandboxsec.sessions.models import AgentSession
from sandboxsec.sessions.nonce import DpopNonces
from sandboxsec.sessions.replay import ReplayStore
from sandboxsec.sessions.signatures import PendingSignature, SignatureChecks
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped

__all__ = ["BindingConfig", "Claim", "RequestProof", "SessionBinding", "SessionState"]

T = TypeVar("T")

_SESSIONS = cast(Table, AgentSession.__table__)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class BindingConfig:
    """How proofs are checked (``docs/configuration.md``: ``SANDBOXSEC_PUBLIC_URL``,
    ``SANDBOXSEC_REQUIRE_SESSION_KEY``, ``SANDBOXSEC_DPOP_*``)."""

    public_url: str | None
    require_session_key: bool = True
    max_age_seconds: int = 60
    skew_seconds: int = 5
    #: check a proof's signature beside the action that waits for it (``acting(overlap=)``)
    parallel_signature_check: bool = True


@dataclass(frozen=True, slots=True)
class RequestProof:
    """What a request brings to prove it acts for a session: the ``DPoP`` header values and
    the request as received (method, path, exact body bytes, the API key it carries)."""

    proofs: tuple[str, ...]
    method: str
    path: str
    body: bytes
    api_key: str


@dataclass(frozen=True, slots=True)
class SessionState:
    """A session as the binding saw it when a request proved it acts in it."""

    session_id: str
    tenant_id: str
    key_thumbprint: str | None
    expires_at: datetime


class SessionBinding:
    """Checks session proofs; ends sessions."""

    def __init__(self, config: BindingConfig, db: Database, clock: Clock, audit: AuditSink,
                 *, replay: ReplayStore | None = None,
                 keys: dpop.KeyCache | None = None,
                 nonces: DpopNonces | None = None) -> None:
        self._config = config
        self._db = db
        self._clock = clock
        self._audit = audit
        self._replay = replay or ReplayStore(db)
        self._keys = keys or dpop.KeyCache()
        self._signatures = SignatureChecks(self._keys, native=config.parallel_signature_check)
        self._nonces = nonces
        # (tenant, session) -> key thumbprint ("" for an unbound session): fixed at start.
        self._session_keys: Lru[tuple[str, str], str] = Lru(16384)

    # -- proofs ---------------------------------------------------------------------------

    def require(self, who: Principal, request: RequestProof, session_id: str, *,
                check_open: bool = True) -> SessionState:
        """Checks 1-5 (module docstring) for a request acting in ``session_id``.

        ``check_open=False`` leaves the ended/expired refusal to the caller's own check, for
        routes whose domain already refuses a closed session with an established code
        (``action_session_expired``, ``trajectory_session_closed``)."""
        now = self._clock.now()
        # 1. One proof.
        proof = _one(request.proofs)
        state: SessionState | None = None
        try:
            # One transaction for the session's row and the proof's claim: this runs before
            # every read and wait, so it costs one round trip (Core statements, not the ORM).
            with self._db.session() as s:
                # 2. The tenant's live session (another tenant's: 404, raised below).
                row = s.execute(
                    select(_SESSIONS.c.key_thumbprint, _SESSIONS.c.expires_at,
                           _SESSIONS.c.ended_at)
                    .where(_SESSIONS.c.id == session_id,
                           _SESSIONS.c.tenant_id == who.tenant_id)
                ).first()
                if row is None:
                    raise NotFoundError("no such session")
                state = SessionState(session_id=session_id, tenant_id=who.tenant_id,
                                     key_thumbprint=row.key_thumbprint,
                                     expires_at=row.expires_at)
                if check_open and not is_live(row, now):
                    _closed(row.ended_at)
                # 3. Bound to a key.
                if row.key_thumbprint is None:
                    if self._config.require_session_key:
                        raise SessionNotBoundError("the session has no TPM-held key to prove")
                    return state
                # 4-5. The proof, then single use.
                self._verify(who.tenant_id, request, proof, session_id=session_id,
                             jkt=row.key_thumbprint, now=now).claim(s)
        except SandboxSecError as exc:
            if state is not None and is_refusal(exc):
                self._refused(who, session_id, exc)
            raise
        return state

    def acting(self, who: Principal, request: RequestProof, session_id: str,
               act: Callable[[Claim], T], *, overlap: bool = False) -> T:
        """Run ``act`` for a request acting in ``session_id`` once its proof verified, with
        the proof's single-use claim (check 5) folded into ``act``'s own transaction.

        Checks 1, 3 and 4 run first, without a write: the session's key thumbprint (fixed
        when the session starts) is read once and then kept in memory.  ``act`` receives a
        :data:`Claim` and calls it inside the transaction in which it writes, so the claim
        and the action commit together, or neither does: a proof is used up exactly when
        the request it proves is carried out, and a replay finds the committed row in any
        worker.  An ``act`` that returns without calling it gets the claim in a transaction
        of its own (never skipped).  Whether the session is open is ``act``'s check (as
        ``check_open=False`` of :meth:`require`).

        ``overlap=True`` starts the signature check and runs ``act`` at once; the
        :data:`Claim` waits for the check first, so it is only for an ``act`` whose every
        effect is in the transaction in which it calls the claim (a forged proof's work then
        rolls back).  Any refusal of ``act`` also waits for it: a forged proof is refused as
        such (``dpop_signature_invalid``), whatever else ``act`` found.
        """
        now = self._clock.now()
        proof = _one(request.proofs)
        jkt = self._session_key(who, session_id)
        try:
            if jkt is None:
                if self._config.require_session_key:
                    raise SessionNotBoundError("the session has no TPM-held key to prove")
                return act(_no_claim)
            pending = self._verify(who.tenant_id, request, proof, session_id=session_id,
                                   jkt=jkt, now=now, overlap=overlap)
            try:
                result = act(pending.claim)
            except BaseException:
                pending.signature_first()
                raise
            if not pending.claimed:
                pending.claim(None)
            return result
        except SandboxSecError as exc:
            if isinstance(exc, _PROOF_REFUSALS):
                self._refused(who, session_id, exc)
            raise

    def check_proof(self, who: Principal, request: RequestProof | None, *,
                    session_id: str, jkt: str, now: datetime) -> dpop.VerifiedProof:
        """Verify the request's proof for ``session_id`` under key ``jkt`` and claim its
        ``jti`` (checks 4-5; also what starting a session runs, with the attestation id)."""
        proof = _one(request.proofs) if request is not None else None
        pending = self._verify(who.tenant_id, request, proof, session_id=session_id, jkt=jkt,
                               now=now)
        pending.claim(None)
        return pending.proof

    def fresh_nonce(self) -> str | None:
        """A ``DPoP-Nonce`` for the next proofs, or None when nonces are not required."""
        return self._nonces.issue(self._clock.now()) if self._nonces is not None else None

    def _session_key(self, who: Principal, session_id: str) -> str | None:
        # The thumbprint never changes after the session starts, so a found session's is
        # kept; an unknown id is asked again every time (404, as for another tenant's).
        cache_key = (who.tenant_id, session_id)
        cached = self._session_keys.get(cache_key)
        if cached is not None:
            return cached or None
        with self._db.session() as s:
            row = s.execute(
                select(_SESSIONS.c.key_thumbprint)
                .where(_SESSIONS.c.id == session_id, _SESSIONS.c.tenant_id == who.tenant_id)
            ).first()
        if row is None:
            raise NotFoundError("no such session")
        self._session_keys.put(cache_key, row.key_thumbprint or "")
        return row.key_thumbprint or None

    def _verify(self, tenant_id: str, request: RequestProof | None, proof: str | None, *,
                session_id: str, jkt: str, now: datetime,
                overlap: bool = False) -> _PendingClaim:
        if request is None or proof is None:
            raise DpopMissingError("send a DPoP proof signed by the session key")
        base = self._config.public_url
        if not base:
            raise DpopUrlUnconfiguredError("SANDBOXSEC_PUBLIC_URL is not configured")
        checked = dpop.check_proof(
            proof, method=request.method, url=base.rstrip("/") + request.path,
            body=request.body, session_id=session_id, jkt=jkt, now=now,
            max_age_seconds=self._config.max_age_seconds,
            skew_seconds=self._config.skew_seconds, api_key=request.api_key,
            keys=self._keys,
        )
        signature = (self._signatures.start(checked.signature) if overlap
                     else self._signatures.now(checked.signature))
        if signature.done:
            # Checked here (asked to, no native module, or a key whose proof failed before):
            # a forged proof is refused before anything is decided.
            signature.require()
        verified = checked.claims
        # 4b. The server nonce, when this deployment hands them out (sessions/nonce.py).
        if self._nonces is not None:
            try:
                self._nonces.check(verified.nonce, now)
            except SandboxSecError:
                signature.require()  # a forged proof is refused as such
                raise
        keep_until = datetime.fromtimestamp(
            verified.iat + self._config.max_age_seconds
            + self._config.skew_seconds + 1, UTC)
        return _PendingClaim(self._replay, tenant_id, verified, keep_until, now, signature)

    # -- lifecycle ------------------------------------------------------------------------

    def end(self, who: Principal, session_id: str, request: RequestProof | None) -> datetime:
        """End ``session_id`` now: nothing more happens in it, its grants are refused.

        An admin ends any session of its tenant; an agent only the session it proves
        (``request`` carries the proof).  Ending is audited in the same transaction.
        """
        if request is not None:
            self.require(who, request, session_id)
        now = self._clock.now()
        table: Any = AgentSession
        with self._db.session() as s:
            row = get_scoped(s, AgentSession, who.tenant_id, session_id, what="session")
            if not is_live(row, now):
                _closed(row.ended_at)
            done = s.execute(
                update(AgentSession)
                .where(table.id == session_id, table.tenant_id == who.tenant_id,
                       table.ended_at.is_(None))
                .values(ended_at=now, ended_by=who.key_id)
            )
            if getattr(done, "rowcount", 0) != 1:
                raise SessionEndedError("the session was ended concurrently")
            self._audit.append(
                AuditRecord.by(who, AuditEvent.SESSION_END, "success",
                               object_ids={"session_id": session_id},
                               body={"ended_at": now.isoformat()}),
                session=s,
            )
        return now

    def _refused(self, who: Principal, session_id: str, exc: SandboxSecError) -> None:
        self._audit.append(AuditRecord.by(who, AuditEvent.SESSION_PROOF_REFUSE, "failure",
                                          reason=exc.reason,
                                          object_ids={"session_id": session_id}))


#: Claims a verified proof's ``jti`` in the transaction it is given (None: one of its own);
#: raises :class:`DpopReplayedError` when the proof was used before.
Claim = Callable[[Session | None], None]

#: What :meth:`SessionBinding.acting` audits as a refused proof (the act's own refusals are
#: the act's to audit).
_PROOF_REFUSALS = (DpopError, DpopMalformedError, SessionNotBoundError)


class _PendingClaim:
    """A checked proof whose ``jti`` is still to be marked used, once; its signature check
    may still be running (then the claim waits for it, and refuses a forged proof)."""

    __slots__ = ("claimed", "keep_until", "now", "proof", "replay", "signature", "tenant_id")

    def __init__(self, replay: ReplayStore, tenant_id: str, proof: dpop.VerifiedProof,
                 keep_until: datetime, now: datetime, signature: PendingSignature) -> None:
        self.replay = replay
        self.tenant_id = tenant_id
        self.proof = proof
        self.keep_until = keep_until
        self.now = now
        self.signature = signature
        self.claimed = False

    def signature_first(self) -> None:
        """Raise :class:`DpopSignatureInvalidError` if the signature check failed (waits)."""
        self.signature.require()

    def claim(self, session: Session | None) -> None:
        if self.claimed:
            return
        self.signature_first()
        won = self.replay.claim(self.tenant_id, self.proof.jkt, self.proof.jti,
                                keep_until=self.keep_until, now=self.now, session=session)
        self.claimed = True
        if not won:
            raise DpopReplayedError("this proof was already used")


def _no_claim(_session: Session | None) -> None:
    # An unbound session (only with require_session_key=false) has no proof to claim.
    return None


def _closed(ended_at: datetime | None) -> None:
    # Which way a session that is not live closed: each has its own reason code.
    if ended_at is not None:
        raise SessionEndedError("the session was ended")
    raise SessionExpiredError("the session has expired")


def _one(values: Sequence[str]) -> str | None:
    # RFC 9449 section 4.3: exactly one DPoP header; two are refused, not chosen between.
    if len(values) > 1:
        raise DpopMalformedError("send exactly one DPoP header")
    return values[0] if values else None
