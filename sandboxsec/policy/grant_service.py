"""Grants: issuing single-use permissions for one exact action, and using them once.

The token format and its checks are pure (:mod:`.grants`); this service stores each grant,
signs tokens with the :class:`~sandboxsec.policy.signing.GrantSigner` and marks a grant used
with a one-winner update, audited in the same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import NotFoundError, SandboxSecError, is_refusal
from sandboxsec.ids import new_id
from sandboxsec.policy.canonical import params_hash
from sandboxsec.policy.config import GrantConfig
from sandboxsec.policy.errors import (
    GrantAlreadyUsedError,
    GrantNotFoundError,
    GrantPolicyDeniedError,
    GrantSessionEndedError,
    GrantSignatureInvalidError,
)
from sandboxsec.policy.grants import GrantClaims, check_grant, decode_grant, encode_grant
from sandboxsec.policy.keyed_audit import ParamsDigester
from sandboxsec.policy.models import GrantRecord
from sandboxsec.policy.repository import IssuedGrant, PolicyRepository, Tx
from sandboxsec.policy.signing import GrantSigner
from sandboxsec.policy.target import resolve_target
from sandboxsec.policy.views import GrantVerdict
from sandboxsec.policy.wakeup import Wakeups
from sandboxsec.principal import Principal
from sandboxsec.sessions.liveness import is_live

if TYPE_CHECKING:
    from sandboxsec.policy.in_force import PolicyInForce

__all__ = ["GrantIssuer", "GrantService", "grant_ids"]


class GrantIssuer(Protocol):
    """Issues grants inside a decision's or an approval's transaction."""

    def prepare(self) -> None:
        """Load (or create) the signing key; call outside any transaction."""
        ...

    def issue(self, tx: Tx, *, tenant_id: str, session_id: str, approval_id: str | None,
              decision_id: str, action: str, resource: str, p_hash: str, now: datetime,
              grant_id: str | None = None) -> IssuedGrant:
        """Store a new grant for one exact action."""
        ...

    def issue_signed(self, tx: Tx, *, tenant_id: str, session_id: str, decision_id: str,
                     action: str, resource: str, p_hash: str, now: datetime
                     ) -> tuple[IssuedGrant, str]:
        """Store a new grant for one exact action and return it with its signed token."""
        ...

    def token(self, record: GrantRecord | IssuedGrant, p_hash: str) -> str:
        """The signed token of a stored grant, binding the plain params hash ``p_hash``."""
        ...


def _canonical_resource(action: str, resource: str | None, params: Mapping[str, Any]
                        ) -> str | None:
    """The canonical form of a resource a downstream names (grants hold canonical ones)."""
    if resource is None:
        return None
    try:
        return resolve_target(action, resource, params).resource
    except SandboxSecError:
        return resource  # compared as given: it cannot equal a canonical one


def grant_ids(claims: GrantClaims) -> dict[str, str]:
    """The audit object ids of a grant."""
    ids = {"grant_id": claims.grant_id, "session_id": claims.session_id}
    if claims.approval_id:
        ids["approval_id"] = claims.approval_id
    return ids


class GrantService:
    """Issues grants, signs their tokens, and verifies and spends them: valid once."""

    def __init__(self, repo: PolicyRepository, clock: Clock, audit: AuditSink,
                 signer: GrantSigner, wakeups: Wakeups, config: GrantConfig,
                 digester: ParamsDigester, in_force: PolicyInForce | None = None) -> None:
        """``digester`` keys the params digest per tenant; ``in_force`` decides a grant's
        action again under the policy in force when the grant is used (see
        policy/redecide.py)."""
        self._in_force = in_force
        self._repo = repo
        self._digester = digester
        self._clock = clock
        self._audit = audit
        self._signer = signer
        self._wakeups = wakeups
        self._config = config

    def prepare(self) -> None:
        """Load (or create) the signing key in its own transaction, never inside another:
        SQLite has one writer, and a nested writer would wait on ourselves."""
        self._signer.signing_key()

    def issue(self, tx: Tx, *, tenant_id: str, session_id: str, approval_id: str | None,
              decision_id: str, action: str, resource: str, p_hash: str, now: datetime,
              grant_id: str | None = None) -> IssuedGrant:
        """Store a new grant for one exact action, signed by the current key."""
        record = self._draft(tx, tenant_id=tenant_id, session_id=session_id,
                             approval_id=approval_id, decision_id=decision_id, action=action,
                             resource=resource, p_hash=p_hash, now=now, grant_id=grant_id)
        self._repo.add_grant(tx, record)
        return record

    def issue_signed(self, tx: Tx, *, tenant_id: str, session_id: str, decision_id: str,
                     action: str, resource: str, p_hash: str, now: datetime
                     ) -> tuple[IssuedGrant, str]:
        """:meth:`issue` (without an approval) and the grant's token, signed before the row
        is written: on SQLite the first write of a transaction takes the writer lock, which
        then need not be held across the signature."""
        record = self._draft(tx, tenant_id=tenant_id, session_id=session_id, approval_id=None,
                             decision_id=decision_id, action=action, resource=resource,
                             p_hash=p_hash, now=now, grant_id=None)
        token = self.token(record, p_hash)
        self._repo.add_grant(tx, record)
        return record, token

    def _draft(self, tx: Tx, *, tenant_id: str, session_id: str, approval_id: str | None,
               decision_id: str, action: str, resource: str, p_hash: str, now: datetime,
               grant_id: str | None) -> IssuedGrant:
        kid, _ = self._signer.signing_key()
        return IssuedGrant(
            id=grant_id or new_id("gr"), tenant_id=tenant_id, session_id=session_id,
            approval_id=approval_id, decision_id=decision_id, action=action,
            resource=resource, key_id=kid, issued_at=now,
            # Stored keyed: the plain hash lives only in the token the agent holds.
            params_hash=self._digester.params_hmac_in(tx, tenant_id, p_hash),
            expires_at=now + timedelta(seconds=self._config.ttl_seconds),
        )

    def token(self, record: GrantRecord | IssuedGrant, p_hash: str) -> str:
        """The signed token of a stored grant (re-signed on demand: Ed25519 is deterministic),
        binding the plain params hash ``p_hash`` (the row holds only its keyed digest)."""
        kid, private = self._signer.signing_key()
        if record.key_id != kid:
            # Issued under a key retired since: re-signing would name the wrong key.
            private = self._signer.private_for(record.key_id)
        claims = GrantClaims(
            grant_id=record.id, tenant_id=record.tenant_id, session_id=record.session_id,
            action=record.action, resource=record.resource, params_hash=p_hash,
            approval_id=record.approval_id, issued_at=record.issued_at,
            expires_at=record.expires_at, key_id=record.key_id,
        )
        return encode_grant(claims, private)

    def public_keys(self) -> dict[str, bytes]:
        """Raw Ed25519 public keys by key id, for downstreams that pre-check grants offline."""
        self._signer.signing_key()
        return {k: v.public_bytes(Encoding.Raw, PublicFormat.Raw)
                for k, v in self._signer.public_keys().items()}

    def verify_grant(self, who: Principal, *, token: str, action: str,
                     params: Mapping[str, Any], resource: str | None = None) -> GrantVerdict:
        """Check a grant against the action about to run and mark it used: valid once.

        1. the token parses and its signature verifies;
        2. it is this tenant's grant;
        3. not expired, same action, params hash to the granted params_hash, same resource;
        4. the grant exists, its session is still live, the policy in force now still allows
           the action (a stricter policy revokes what it no longer allows), and it was not
           used: marked used with a
           conditional update, so of two concurrent uses exactly one wins; its approval
           becomes ``consumed``.
        """
        now = self._clock.now()
        claims: GrantClaims | None = None
        try:
            # 1. signature (re-read the key list once for a key id not seen yet)
            try:
                claims = decode_grant(token, self._signer.cached_public_keys())
            except GrantSignatureInvalidError:
                claims = decode_grant(token, self._signer.public_keys())
            # 2. tenant: another tenant's grant is indistinguishable from none
            if claims.tenant_id != who.tenant_id:
                raise GrantNotFoundError("no such grant")
            # 3. binding
            check_grant(claims, now=now, action=action, params_hash=params_hash(params),
                        resource=_canonical_resource(action, resource, params))
            # 4. single use
            with self._repo.transaction() as tx:
                record = self._repo.grant(tx, who.tenant_id, claims.grant_id)
                # Grants stored before keyed digests hold the plain hash (for their few
                # minutes of life); newer ones the tenant-keyed digest.
                stored_ok = record.params_hash in (
                    self._digester.params_hmac_in(tx, who.tenant_id, claims.params_hash),
                    claims.params_hash,
                )
                if not stored_ok or (record.action, record.session_id) != (
                        claims.action, claims.session_id):
                    raise GrantSignatureInvalidError("the grant does not match its record")
                # A session ended early (for example after a compromise) takes its grants
                # with it.
                try:
                    session = self._repo.session(tx, who.tenant_id, record.session_id)
                except NotFoundError:
                    session = None
                if session is None or not is_live(session, now):
                    raise GrantSessionEndedError("the grant's session has ended")
                # The policy in force now still allows it (see policy/redecide.py).
                if self._in_force is not None:
                    why = self._in_force.grant_refusal(tx, record, session, params)
                    if why is not None:
                        raise GrantPolicyDeniedError(why)
                if not self._repo.use_grant(tx, who.tenant_id, record.id, now, who.key_id):
                    raise GrantAlreadyUsedError("this grant was used already")
                if record.approval_id is not None:
                    self._repo.consume_approval(tx, who.tenant_id, record.approval_id)
                    self._repo.announce(tx, record.approval_id)
                self._audit.append(
                    AuditRecord.by(who, AuditEvent.GRANT_VERIFY, "success",
                                   object_ids=grant_ids(claims),
                                   body={"action": action, "params_hash": claims.params_hash}),
                    session=tx,
                )
        except SandboxSecError as exc:
            if not is_refusal(exc):
                raise
            with self._repo.transaction() as tx:
                self._audit.append(
                    AuditRecord.by(who, AuditEvent.GRANT_REJECT, "refused", reason=exc.reason,
                                   object_ids=grant_ids(claims) if claims else {},
                                   body={"action": action if isinstance(action, str) else ""}),
                    session=tx,
                )
            raise
        if record.approval_id is not None:
            self._wakeups.notify(record.approval_id)
        return GrantVerdict(grant_id=record.id, session_id=record.session_id,
                            approval_id=record.approval_id, action=record.action,
                            resource=record.resource, params_hash=claims.params_hash,
                            expires_at=record.expires_at, used_at=now)
