"""The policy service: decisions on agent actions, approval requests, grants, policy admin.

The adapter around the pure core (:mod:`.engine`, :mod:`.approvals`, :mod:`.grants`,
:mod:`.canonical`): it reads and writes the database, appends audit entries in the same
transaction as each state change (an audit failure rolls the change back: fail closed), and
wakes agents waiting on an approval.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import anyio
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from sqlalchemy import CursorResult, func, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.clock import rfc3339
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.people.routes import key_approval_refusal, route_new_request
from sandboxsec.policy.approvals import (
    ApprovalEvent,
    ApprovalState,
    check_decision,
    effective_state,
)
from sandboxsec.policy.canonical import canonical_json, params_hash, parse_amount, short_code
from sandboxsec.policy.engine import (
    ActionContext,
    CompiledPolicy,
    Decision,
    Outcome,
    PolicyEngine,
    bundled_default_policy,
)
from sandboxsec.policy.errors import (
    ActionInvalidError,
    ActionSessionExpiredError,
    ApprovalExpiredError,
    ApprovalNotPendingError,
    ApprovalPendingLimitError,
    GrantAlreadyUsedError,
    GrantKeyUnavailableError,
    GrantNotFoundError,
    GrantSessionEndedError,
    GrantSignatureInvalidError,
    PolicyVersionConflictError,
)
from sandboxsec.policy.grants import GrantClaims, check_grant, decode_grant, encode_grant, key_id
from sandboxsec.policy.models import (
    ApprovalRequest,
    GrantRecord,
    GrantSigningKey,
    LoginDomain,
    PolicyRevision,
)
from sandboxsec.policy.notify import WebhookNotifier
from sandboxsec.policy.wakeup import CHANNEL, PgListener, Wakeups
from sandboxsec.principal import Principal, Role
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.tenancy import get_scoped, select_scoped
from sandboxsec.webhooks.outbox import enqueue

if TYPE_CHECKING:
    from sandboxsec.services import Services

__all__ = [
    "MAX_PENDING_PER_SESSION",
    "ActionResult",
    "ApprovalView",
    "GrantVerdict",
    "PolicyService",
    "PolicyView",
]

log = structlog.get_logger("sandboxsec.policy")

_ACTION = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_RESOURCE_KINDS = ("app", "domain", "payee")
_MAX_RESOURCE = 512
# When no SQLite recheck applies (PostgreSQL), waiters still re-read this often in case a
# notification was lost while the listener reconnected.
_PG_SAFETY_RECHECK = 10.0
#: Pending approval requests one session may have open at once.  A flood of requests is how
#: an agent wears a person down until they approve without reading (approval fatigue).
MAX_PENDING_PER_SESSION = 10


@dataclass(frozen=True, slots=True)
class PolicyView:
    """A tenant's policy in force."""

    tenant_id: str
    version: int
    text: str
    sha256: str
    rule_count: int
    is_default: bool
    updated_at: datetime | None
    updated_by: str | None


@dataclass(frozen=True, slots=True)
class ApprovalView:
    """An approval request as its tenant's agent or approver sees it."""

    id: str
    state: ApprovalState
    session_id: str
    action: str
    resource: str
    params: dict[str, Any]
    params_hash: str
    short_code: str
    requested_by: str
    decision_id: str
    rule_id: str
    reason: str
    image_name: str
    image_digest: str
    attested: bool
    created_at: datetime
    expires_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    grant: str | None
    grant_expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class ActionResult:
    """The answer to ``POST /v1/actions``."""

    decision: Decision
    params_hash: str
    short_code: str
    approval: ApprovalView | None
    grant: str | None
    grant_expires_at: datetime | None
    #: False when an identical pending request was answered instead of opening a new one
    new_approval: bool = False


@dataclass(frozen=True, slots=True)
class GrantVerdict:
    """A grant that verified (and is now used)."""

    grant_id: str
    session_id: str
    approval_id: str | None
    action: str
    resource: str
    params_hash: str
    expires_at: datetime
    used_at: datetime


def _normalize_domain(value: str) -> str:
    return value.strip().rstrip(".").lower()


def _text_field(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_RESOURCE:
        raise ActionInvalidError(f"{name} must be a non-empty string of at most 512 characters")
    if not value.isprintable():
        raise ActionInvalidError(f"{name} must not contain control characters")
    return value


class _Keyring:
    """The grant signing key, shared by every worker through the database."""

    def __init__(self, services: Services) -> None:
        self._s = services
        self._lock = threading.Lock()
        self._signing: tuple[str, Ed25519PrivateKey] | None = None
        self._public: dict[str, Ed25519PublicKey] = {}

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        with self._lock:
            if self._signing is None:
                self._signing = self._load_or_create()
            return self._signing

    def cached_public_keys(self) -> dict[str, Ed25519PublicKey]:
        with self._lock:
            return dict(self._public)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every grant public key, re-read from the database."""
        with self._s.db.session() as s:
            rows = s.exec(select(GrantSigningKey)).all()
        keys = {r.id: Ed25519PublicKey.from_public_bytes(r.public_key) for r in rows}
        with self._lock:
            self._public = keys
            return dict(keys)

    def _load_or_create(self) -> tuple[str, Ed25519PrivateKey]:
        with self._s.db.session() as s:
            row = self._active(s)
        if row is None:
            private = Ed25519PrivateKey.generate()
            kid = key_id(private.public_key())
            raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            try:
                wrapped = self._s.keys.wrap(raw, _key_aad(kid))
                provider = self._s.keys.provider_id
            except SandboxSecError as exc:
                raise GrantKeyUnavailableError("the root key cannot wrap a grant key") from exc
            with self._s.db.session() as s:
                s.add(GrantSigningKey(
                    id=kid, private_key=wrapped, provider_id=provider,
                    public_key=private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                    created_at=self._s.clock.now(),
                ))
        # Two workers may have created a key at once: everyone uses the oldest one.
        with self._s.db.session() as s:
            row = self._active(s)
        assert row is not None
        return row.id, self.unwrap(row)

    def unwrap(self, row: GrantSigningKey) -> Ed25519PrivateKey:
        try:
            raw = self._s.keys.unwrap(row.private_key, _key_aad(row.id))
        except SandboxSecError as exc:
            raise GrantKeyUnavailableError("the grant signing key cannot be unwrapped") from exc
        return Ed25519PrivateKey.from_private_bytes(raw)

    @staticmethod
    def _active(s: Session) -> GrantSigningKey | None:
        return s.exec(
            select(GrantSigningKey)
            .where(col(GrantSigningKey.retired_at).is_(None))
            .order_by(col(GrantSigningKey.created_at), col(GrantSigningKey.id))
        ).first()


class PolicyService:
    """Decides agent actions and runs approvals and grants for every tenant."""

    def __init__(self, services: Services) -> None:
        self._s = services
        settings = services.settings
        self.engine = PolicyEngine(cache_size=settings.policy_cache_size)
        self.wakeups = Wakeups()
        self._keyring = _Keyring(services)
        self._default_text = bundled_default_policy()
        self._listener: PgListener | None = None
        self._listener_lock = threading.Lock()
        self._notifier: WebhookNotifier | None = None
        if settings.approval_webhook_url and settings.approval_webhook_secret:
            self._notifier = WebhookNotifier(
                settings.approval_webhook_url,
                settings.approval_webhook_secret.encode("utf-8"),
                max_attempts=settings.approval_webhook_max_attempts,
            )

    def close(self) -> None:
        """Stop the LISTEN thread and the webhook sender."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None

    # ------------------------------------------------------------------ audit helper

    def _audit(
        self,
        s: Session | None,
        who: Principal,
        event: AuditEvent,
        outcome: str,
        *,
        reason: str | None = None,
        object_ids: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        sensitive: Mapping[str, str] | None = None,
        batch: list[AuditRecord] | None = None,
    ) -> None:
        """Append one audit record in ``s``'s transaction, or add it to ``batch``.

        A batch is written with one ``append_many`` (one lock of the log head instead of one
        per record) by the caller, still inside the same transaction.
        """
        record = AuditRecord.by(who, event, outcome, reason=reason, object_ids=object_ids,
                                body=body, sensitive=sensitive)
        if batch is not None:
            batch.append(record)
        else:
            self._s.audit.append(record, session=s)

    def _notify_db(self, s: Session, approval_id: str) -> None:
        # Delivered to other processes only when this transaction commits.
        if self._s.db.is_postgres:
            s.execute(text("SELECT pg_notify(:channel, :payload)"),
                      {"channel": CHANNEL, "payload": approval_id})

    # ------------------------------------------------------------------ policy admin

    def _current_version(self, s: Session, tenant_id: str) -> int:
        version = s.exec(
            select(func.max(PolicyRevision.version)).where(PolicyRevision.tenant_id == tenant_id)
        ).one()
        return int(version or 0)

    def _load_text(self, tenant_id: str, version: int) -> str:
        if version == 0:
            return self._default_text
        with self._s.db.session() as s:
            row = s.exec(select(PolicyRevision).where(
                PolicyRevision.tenant_id == tenant_id, PolicyRevision.version == version
            )).first()
        if row is None:
            # The version was read a moment ago in another transaction; it cannot vanish.
            raise SandboxSecError("policy revision disappeared")
        return row.text

    def get_policy(self, who: Principal) -> PolicyView:
        """The tenant's policy in force (version 0 is the shipped default)."""
        with self._s.db.session() as s:
            row = s.exec(
                select(PolicyRevision)
                .where(PolicyRevision.tenant_id == who.tenant_id)
                .order_by(col(PolicyRevision.version).desc())
            ).first()
        if row is None:
            compiled = self.engine.compile(self._default_text)
            return PolicyView(who.tenant_id, 0, self._default_text, compiled.sha256,
                              len(compiled.rules), True, None, None)
        return PolicyView(who.tenant_id, row.version, row.text, row.sha256, row.rule_count,
                          False, row.created_at, row.created_by)

    def validate_policy(self, text_: str) -> CompiledPolicy:
        """Compile ``text_`` or raise ``PolicyInvalidError`` naming the failing line."""
        return self.engine.compile(text_)

    def replace_policy(self, who: Principal, text_: str, *, base_version: int | None = None
                       ) -> PolicyView:
        """Validate and install a new policy for the tenant; a bad one leaves the old in force.

        1. the text compiles (else refused with the failing line, audited);
        2. when ``base_version`` is given, it is still the version in force;
        3. the new revision is stored as version + 1, audited in the same transaction.
        """
        # 1. validate before anything is stored
        try:
            compiled = self.engine.compile(text_)
        except SandboxSecError as exc:
            with self._s.db.session() as s:
                self._audit(s, who, AuditEvent.POLICY_UPDATE_REJECT, "refused",
                            reason=exc.reason, body={"message": exc.message[:500]})
            raise
        now = self._s.clock.now()
        try:
            with self._s.db.session() as s:
                # 2. optimistic concurrency
                current = self._current_version(s, who.tenant_id)
                if base_version is not None and base_version != current:
                    raise PolicyVersionConflictError(
                        f"the policy is at version {current}, not {base_version}"
                    )
                # 3. store and audit together
                row = PolicyRevision(
                    id=new_id("pol"), tenant_id=who.tenant_id, version=current + 1, text=text_,
                    sha256=compiled.sha256, rule_count=len(compiled.rules), created_at=now,
                    created_by=who.key_id,
                )
                s.add(row)
                s.flush()
                self._audit(s, who, AuditEvent.POLICY_UPDATE, "success",
                            object_ids={"policy_revision_id": row.id},
                            body={"version": row.version, "sha256": row.sha256,
                                  "rule_count": row.rule_count})
        except IntegrityError as exc:
            raise PolicyVersionConflictError(
                "another change to this policy landed first; read it and try again"
            ) from exc
        return PolicyView(who.tenant_id, row.version, row.text, row.sha256, row.rule_count,
                          False, row.created_at, row.created_by)

    # ------------------------------------------------------------------ decisions

    def _context(self, who: Principal, session: AgentSession, action: str, resource: str,
                 params: Mapping[str, Any]) -> ActionContext:
        attrs: dict[str, str] = {}
        kind, sep, value = resource.partition(":")
        if sep and kind in _RESOURCE_KINDS:
            attrs[kind] = _normalize_domain(value) if kind == "domain" else value
        for name in _RESOURCE_KINDS:
            if name not in params:
                continue
            given = _text_field(f"params.{name}", params[name])
            if name == "domain":
                given = _normalize_domain(given)
            # The resource and the params must not tell two stories: rules read one, the
            # downstream executes the other.
            if name in attrs and attrs[name] != given:
                raise ActionInvalidError(f"resource names {name} {attrs[name]!r} "
                                         f"but params.{name} is {given!r}")
            attrs[name] = given
        amount = parse_amount(params["amount"]) if "amount" in params else None
        currency = params.get("currency")
        if currency is not None and (not isinstance(currency, str)
                                     or not _CURRENCY.fullmatch(currency)):
            raise ActionInvalidError("currency must be an ISO 4217 code such as \"EUR\"")
        if action == "payment" and (amount is None or currency is None):
            raise ActionInvalidError("a payment needs params.amount and params.currency")
        if action == "login" and "domain" not in attrs:
            raise ActionInvalidError("a login needs a domain (resource domain:<name>)")
        return ActionContext(
            tenant_id=who.tenant_id,
            role=str(who.role),
            session_id=session.id,
            attested=bool(session.attested),
            image_name=session.image_name,
            image_digest=session.image_digest,
            action=action,
            resource=resource,
            amount=amount,
            currency=currency,
            app=attrs.get("app"),
            domain=attrs.get("domain"),
            payee=attrs.get("payee"),
        )

    def request_action(self, who: Principal, *, session_id: str, action: str, resource: str,
                       params: Mapping[str, Any]) -> ActionResult:
        """Decide one action of an agent; approval_required opens an approval request.

        1. the input is well formed and the params have a canonical form;
        2. the session is this tenant's and still live;
        3. the tenant's policy in force (version read per decision) decides;
        4. the decision, and the approval request or grant it creates, are stored and audited
           in one transaction.
        """
        now = self._s.clock.now()
        # 1. input
        if not isinstance(action, str) or not _ACTION.fullmatch(action):
            raise ActionInvalidError("action must match [a-z][a-z0-9_.-]{0,63}")
        resource = _text_field("resource", resource)
        canonical = canonical_json(params)
        p_hash = params_hash(params)
        code = short_code(p_hash)
        # The signing key is loaded (or created) in its own transaction, never inside the one
        # below: SQLite has one writer, and a nested writer would wait on ourselves.
        self._keyring.signing_key()
        refused: SandboxSecError | None = None
        result: ActionResult | None = None
        with self._s.db.session() as s:
            # 2. session
            session = get_scoped(s, AgentSession, who.tenant_id, session_id, what="session")
            if session.ended_at is not None or now >= session.expires_at:
                refused = ActionSessionExpiredError("the session has expired or ended")
                self._audit(s, who, AuditEvent.POLICY_DECISION, "deny", reason=refused.reason,
                            object_ids={"session_id": session.id},
                            body={"action": action, "params_hash": p_hash})
            else:
                ctx = self._context(who, session, action, resource, params)
                if ctx.domain is not None and action == "login":
                    seen = s.exec(select(LoginDomain.id).where(
                        LoginDomain.tenant_id == who.tenant_id, LoginDomain.domain == ctx.domain
                    )).first()
                    ctx = _with_new_domain(ctx, seen is None)
                # 3. decide under the version in force right now
                version = self._current_version(s, who.tenant_id)
                decision = self.engine.decide(
                    ctx, version=version,
                    load_text=lambda: self._load_text(who.tenant_id, version),
                    decision_id=new_id("dec"),
                )
                # 4. persist (an agent retrying asks the approver once; a flood is refused)
                existing: ApprovalRequest | None = None
                if decision.outcome is Outcome.APPROVAL_REQUIRED:
                    pending = self._pending(s, who.tenant_id, session.id, now)
                    existing = next((p for p in pending if (p.action, p.resource, p.params_hash)
                                     == (action, resource, p_hash)), None)
                    if existing is None and len(pending) >= MAX_PENDING_PER_SESSION:
                        refused = ApprovalPendingLimitError(
                            f"this session already has {len(pending)} pending approval requests"
                        )
                        self._audit(s, who, AuditEvent.POLICY_DECISION, "deny",
                                    reason=refused.reason,
                                    object_ids={"session_id": session.id,
                                                "decision_id": decision.decision_id},
                                    body={"action": action, "params_hash": p_hash,
                                          "rule_id": decision.rule_id})
                if refused is None:
                    result = self._record_decision(s, who, session, ctx, decision, canonical,
                                                   p_hash, code, now, existing)
        if refused is not None:
            raise refused
        assert result is not None
        d = result.decision
        log.info("policy_decision", decision_id=d.decision_id, outcome=d.outcome.value,
                 rule_id=d.rule_id, policy_version=d.policy_version,
                 approval_id=result.approval.id if result.approval else None)
        if result.new_approval and result.approval is not None:
            self._send_webhook(who, result.approval)
        return result

    @staticmethod
    def _pending(s: Session, tenant_id: str, session_id: str, now: datetime
                 ) -> list[ApprovalRequest]:
        return list(s.exec(select(ApprovalRequest).where(
            ApprovalRequest.tenant_id == tenant_id,
            ApprovalRequest.session_id == session_id,
            ApprovalRequest.state == ApprovalState.PENDING.value,
            col(ApprovalRequest.expires_at) > now,
        )).all())

    def _record_decision(self, s: Session, who: Principal, session: AgentSession,
                         ctx: ActionContext, decision: Decision, canonical: bytes, p_hash: str,
                         code: str, now: datetime, existing: ApprovalRequest | None
                         ) -> ActionResult:
        object_ids = {"session_id": session.id, "decision_id": decision.decision_id}
        body: dict[str, Any] = {
            "action": ctx.action, "params_hash": p_hash, "rule_id": decision.rule_id,
            "policy_version": decision.policy_version, "policy_sha256": decision.policy_sha256,
        }
        if ctx.amount is not None:
            body["amount"] = str(ctx.amount)
        if ctx.currency is not None:
            body["currency"] = ctx.currency
        sensitive = {"resource": ctx.resource}
        approval: ApprovalView | None = None
        routed: dict[str, Any] = {}
        grant: str | None = None
        grant_expires: datetime | None = None
        if decision.outcome is Outcome.APPROVAL_REQUIRED and existing is not None:
            # The same request is already waiting: answer with it instead of asking again.
            object_ids["approval_id"] = existing.id
            body["reused_pending_request"] = True
            approval = self._view(existing, None, None)
        elif decision.outcome is Outcome.APPROVAL_REQUIRED:
            row = ApprovalRequest(
                id=new_id("apr"), tenant_id=who.tenant_id, session_id=session.id,
                action=ctx.action, resource=ctx.resource, params_json=canonical.decode("utf-8"),
                params_hash=p_hash, short_code=code, state=ApprovalState.PENDING.value,
                requested_by=who.key_id, decision_id=decision.decision_id,
                rule_id=decision.rule_id, reason=decision.explanation[:1000],
                image_name=session.image_name, image_digest=session.image_digest,
                attested=bool(session.attested), created_at=now,
                expires_at=now + timedelta(seconds=self._s.settings.approval_ttl_seconds),
            )
            s.add(row)
            object_ids["approval_id"] = row.id
            approval = self._view(row, None, None)
            compiled = self.engine.policy_for(
                who.tenant_id, decision.policy_version,
                lambda: self._load_text(who.tenant_id, decision.policy_version))
            routed = route_new_request(s, row, compiled.routes.get(decision.rule_id))
            # Announced from the tenant's webhook outbox, in this same transaction.
            enqueue(s, who.tenant_id, "approval.requested", {
                "approval_id": row.id, "action": row.action, "short_code": row.short_code,
                "params_hash": row.params_hash, "expires_at": rfc3339(row.expires_at),
                "routed_to": routed["routed_to"], "approve_path": f"/approve/{row.id}"}, now)
        elif decision.outcome is Outcome.ALLOW:
            record = self._new_grant(s, who.tenant_id, session.id, None, decision.decision_id,
                                     ctx.action, ctx.resource, p_hash, now)
            grant, grant_expires = self._token(record), record.expires_at
            object_ids["grant_id"] = record.id
            if ctx.action == "login" and ctx.domain is not None:
                self._remember_domain(s, who.tenant_id, ctx.domain, session.id, now)
        batch: list[AuditRecord] = []
        self._audit(s, who, AuditEvent.POLICY_DECISION, decision.outcome.value,
                    reason=decision.rule_id, object_ids=object_ids, body=body,
                    sensitive=sensitive, batch=batch)
        if approval is not None and existing is None:
            self._audit(s, who, AuditEvent.APPROVAL_REQUEST, "pending",
                        object_ids={"approval_id": approval.id, "session_id": session.id},
                        body={"action": ctx.action, "params_hash": p_hash,
                              "expires_at": rfc3339(approval.expires_at), **routed},
                        sensitive=sensitive, batch=batch)
        if grant is not None:
            self._audit(s, who, AuditEvent.GRANT_ISSUE, "success",
                        object_ids={"grant_id": object_ids["grant_id"],
                                    "session_id": session.id},
                        body={"action": ctx.action, "params_hash": p_hash}, batch=batch)
        self._s.audit.append_many(batch, session=s)
        return ActionResult(decision, p_hash, code, approval, grant, grant_expires,
                            new_approval=approval is not None and existing is None)

    def _remember_domain(self, s: Session, tenant_id: str, domain: str, session_id: str,
                         now: datetime) -> None:
        values = {"id": new_id("ld"), "tenant_id": tenant_id, "domain": domain,
                  "first_session_id": session_id, "first_seen_at": now}
        # ON CONFLICT DO NOTHING: a concurrent first login to the same domain must not fail
        # (or undo) this decision.
        insert = pg_insert if self._s.db.is_postgres else sqlite_insert
        s.execute(insert(LoginDomain).values(**values).on_conflict_do_nothing())

    # ------------------------------------------------------------------ grants

    def _new_grant(self, s: Session, tenant_id: str, session_id: str, approval_id: str | None,
                   decision_id: str, action: str, resource: str, p_hash: str,
                   now: datetime, *, grant_id: str | None = None) -> GrantRecord:
        kid, _ = self._keyring.signing_key()
        record = GrantRecord(
            id=grant_id or new_id("gr"), tenant_id=tenant_id, session_id=session_id,
            approval_id=approval_id,
            decision_id=decision_id, action=action, resource=resource, params_hash=p_hash,
            key_id=kid, issued_at=now,
            expires_at=now + timedelta(seconds=self._s.settings.grant_ttl_seconds),
        )
        s.add(record)
        return record

    def _token(self, record: GrantRecord) -> str:
        kid, private = self._keyring.signing_key()
        if record.key_id != kid:
            # Issued under a key retired since: re-signing would name the wrong key.
            private = self._private_for(record.key_id)
        claims = GrantClaims(
            grant_id=record.id, tenant_id=record.tenant_id, session_id=record.session_id,
            action=record.action, resource=record.resource, params_hash=record.params_hash,
            approval_id=record.approval_id, issued_at=record.issued_at,
            expires_at=record.expires_at, key_id=record.key_id,
        )
        return encode_grant(claims, private)

    def _private_for(self, kid: str) -> Ed25519PrivateKey:
        with self._s.db.session() as s:
            row = s.get(GrantSigningKey, kid)
        if row is None:
            raise GrantSignatureInvalidError("the grant's signing key is gone")
        return self._keyring.unwrap(row)

    def public_keys(self) -> dict[str, bytes]:
        """Raw Ed25519 public keys by key id, for downstreams that pre-check grants offline."""
        self._keyring.signing_key()
        return {k: v.public_bytes(Encoding.Raw, PublicFormat.Raw)
                for k, v in self._keyring.public_keys().items()}

    def verify_grant(self, who: Principal, *, token: str, action: str,
                     params: Mapping[str, Any], resource: str | None = None) -> GrantVerdict:
        """Check a grant against the action about to run and mark it used: valid once.

        1. the token parses and its signature verifies;
        2. it is this tenant's grant;
        3. not expired, same action, params hash to the granted params_hash, same resource;
        4. the grant exists, its session is still live, and it was not used: marked used with a
           conditional update, so of two concurrent uses exactly one wins; its approval
           becomes ``consumed``.
        """
        now = self._s.clock.now()
        claims: GrantClaims | None = None
        try:
            # 1. signature (re-read the key list once for a key id not seen yet)
            try:
                claims = decode_grant(token, self._keyring.cached_public_keys())
            except GrantSignatureInvalidError:
                claims = decode_grant(token, self._keyring.public_keys())
            # 2. tenant: another tenant's grant is indistinguishable from none
            if claims.tenant_id != who.tenant_id:
                raise GrantNotFoundError("no such grant")
            # 3. binding
            check_grant(claims, now=now, action=action, params_hash=params_hash(params),
                        resource=resource)
            # 4. single use
            with self._s.db.session() as s:
                record = get_scoped(s, GrantRecord, who.tenant_id, claims.grant_id, what="grant")
                if (record.params_hash, record.action, record.session_id) != (
                        claims.params_hash, claims.action, claims.session_id):
                    raise GrantSignatureInvalidError("the grant does not match its record")
                # A session ended early (for example after a compromise) takes its grants
                # with it.
                session = s.get(AgentSession, record.session_id)
                if (session is None or session.tenant_id != who.tenant_id
                        or session.ended_at is not None or now >= session.expires_at):
                    raise GrantSessionEndedError("the grant's session has ended")
                won = _rowcount(s.execute(
                    update(GrantRecord)
                    .where(col(GrantRecord.id) == record.id,
                           col(GrantRecord.tenant_id) == who.tenant_id,
                           col(GrantRecord.used_at).is_(None))
                    .values(used_at=now, used_by=who.key_id)
                ))
                if won != 1:
                    raise GrantAlreadyUsedError("this grant was used already")
                if record.approval_id is not None:
                    s.execute(
                        update(ApprovalRequest)
                        .where(col(ApprovalRequest.id) == record.approval_id,
                               col(ApprovalRequest.tenant_id) == who.tenant_id,
                               col(ApprovalRequest.state) == ApprovalState.APPROVED.value)
                        .values(state=ApprovalState.CONSUMED.value)
                    )
                    self._notify_db(s, record.approval_id)
                self._audit(s, who, AuditEvent.GRANT_VERIFY, "success",
                            object_ids=_grant_ids(claims),
                            body={"action": action, "params_hash": claims.params_hash})
        except SandboxSecError as exc:
            if exc.status >= 500:
                raise
            with self._s.db.session() as s:
                self._audit(s, who, AuditEvent.GRANT_REJECT, "refused", reason=exc.reason,
                            object_ids=_grant_ids(claims) if claims else {},
                            body={"action": action if isinstance(action, str) else ""})
            raise
        if record.approval_id is not None:
            self.wakeups.notify(record.approval_id)
        return GrantVerdict(record.id, record.session_id, record.approval_id, record.action,
                            record.resource, record.params_hash, record.expires_at, now)

    # ------------------------------------------------------------------ approvals

    def _view(self, row: ApprovalRequest, grant: str | None, grant_expires: datetime | None,
              state: ApprovalState | None = None) -> ApprovalView:
        return ApprovalView(
            id=row.id, state=state or ApprovalState(row.state), session_id=row.session_id,
            action=row.action, resource=row.resource, params=json.loads(row.params_json),
            params_hash=row.params_hash, short_code=row.short_code,
            requested_by=row.requested_by, decision_id=row.decision_id, rule_id=row.rule_id,
            reason=row.reason, image_name=row.image_name, image_digest=row.image_digest,
            attested=row.attested, created_at=row.created_at, expires_at=row.expires_at,
            decided_at=row.decided_at, decided_by=row.decided_by, grant=grant,
            grant_expires_at=grant_expires,
        )

    def _expire(self, s: Session, who: Principal, row: ApprovalRequest, now: datetime) -> bool:
        """Write the expiry of a pending request past its deadline (conditional, audited)."""
        won = _rowcount(s.execute(
            update(ApprovalRequest)
            .where(col(ApprovalRequest.id) == row.id,
                   col(ApprovalRequest.tenant_id) == row.tenant_id,
                   col(ApprovalRequest.state) == ApprovalState.PENDING.value,
                   col(ApprovalRequest.expires_at) <= now)
            .values(state=ApprovalState.EXPIRED.value)
        ))
        if won == 1:
            self._audit(s, who, AuditEvent.APPROVAL_EXPIRE, "expired",
                        object_ids={"approval_id": row.id, "session_id": row.session_id},
                        body={"expires_at": rfc3339(row.expires_at)})
            self._notify_db(s, row.id)
            row.state = ApprovalState.EXPIRED.value
        return won == 1

    def list_approvals(self, who: Principal, *, state: ApprovalState | None = None,
                       session_id: str | None = None, limit: int = 50) -> list[ApprovalView]:
        """The tenant's approval requests, newest first (never with grants).

        States are as of now: a pending request past its expiry is listed as ``expired``
        (the expiry itself is written when the request is next read or decided).
        """
        now = self._s.clock.now()
        query = select_scoped(ApprovalRequest, who.tenant_id)
        if session_id is not None:
            query = query.where(ApprovalRequest.session_id == session_id)
        if state is ApprovalState.PENDING:
            query = query.where(ApprovalRequest.state == state.value,
                                col(ApprovalRequest.expires_at) > now)
        elif state is ApprovalState.EXPIRED:
            query = query.where(
                (col(ApprovalRequest.state) == state.value)
                | ((col(ApprovalRequest.state) == ApprovalState.PENDING.value)
                   & (col(ApprovalRequest.expires_at) <= now)))
        elif state is not None:
            query = query.where(ApprovalRequest.state == state.value)
        query = query.order_by(col(ApprovalRequest.created_at).desc(),
                               col(ApprovalRequest.id)).limit(max(1, min(limit, 200)))
        with self._s.db.session() as s:
            rows = list(s.exec(query).all())
        return [self._view(r, None, None,
                           effective_state(ApprovalState(r.state), r.expires_at, now))
                for r in rows]

    def get_approval(self, who: Principal, approval_id: str) -> ApprovalView:
        """The request as ``who`` may see it; the agent key that asked also gets its grant."""
        now = self._s.clock.now()
        expired = False
        if who.role is Role.AGENT:
            self._keyring.signing_key()  # outside the transaction (see request_action)
        with self._s.db.session() as s:
            row = get_scoped(s, ApprovalRequest, who.tenant_id, approval_id, what="approval")
            if effective_state(ApprovalState(row.state), row.expires_at, now) is not \
                    ApprovalState(row.state):
                expired = self._expire(s, who, row, now)
            grant = grant_expires = None
            # The grant goes only to the agent key that asked: an approver (or another agent
            # of the tenant) can read the request but never lift its grant.
            if (who.role is Role.AGENT and who.key_id == row.requested_by
                    and row.state == ApprovalState.APPROVED.value and row.grant_id is not None):
                record = s.get(GrantRecord, row.grant_id)
                if record is not None and record.used_at is None and now < record.expires_at:
                    grant, grant_expires = self._token(record), record.expires_at
        if expired:
            self.wakeups.notify(row.id)
        return self._view(row, grant, grant_expires)

    def decide(self, who: Principal, approval_id: str, event: ApprovalEvent,
               shown_params_hash: str) -> ApprovalView:
        """The approver approves or denies exactly what they were shown.

        1. the request is this tenant's (404 otherwise), pending and not expired;
        2. ``shown_params_hash`` equals the request's;
        3. the state changes with a conditional update on ``pending``: of two concurrent
           decisions exactly one wins, the other is refused;
        4. approval issues the grant; state change, grant and audit commit together.
        Refusals are audited too, and change nothing.
        """
        now = self._s.clock.now()
        self._keyring.signing_key()  # outside the transaction (see request_action)
        refused: SandboxSecError | None = None
        with self._s.db.session() as s:
            # 1.-2. pure checks on the current row
            row = get_scoped(s, ApprovalRequest, who.tenant_id, approval_id, what="approval")
            try:
                new_state = check_decision(
                    state=ApprovalState(row.state), event=event, expires_at=row.expires_at,
                    now=now, shown_params_hash=shown_params_hash, params_hash=row.params_hash,
                )
            except SandboxSecError as exc:
                refused = exc
                if isinstance(exc, ApprovalExpiredError):
                    self._expire(s, who, row, now)
            if refused is None and event is ApprovalEvent.APPROVE:
                # 2b. the policy may demand a person's passkey (the machine path then only
                #     denies); a quorum is only ever met by people
                refused = key_approval_refusal(s, who.tenant_id, row.id)
            if refused is None:
                # 3. one winner
                grant_id = new_id("gr") if new_state is ApprovalState.APPROVED else None
                won = _rowcount(s.execute(
                    update(ApprovalRequest)
                    .where(col(ApprovalRequest.id) == row.id,
                           col(ApprovalRequest.tenant_id) == who.tenant_id,
                           col(ApprovalRequest.state) == ApprovalState.PENDING.value,
                           col(ApprovalRequest.expires_at) > now)
                    .values(state=new_state.value, decided_at=now, decided_by=who.key_id,
                            grant_id=grant_id)
                ))
                if won != 1:
                    refused = _lost_race()
            if refused is not None:
                self._audit(s, who, AuditEvent.APPROVAL_REFUSE, "refused", reason=refused.reason,
                            object_ids={"approval_id": row.id, "session_id": row.session_id},
                            body={"attempted": event.value})
            else:
                # 4. grant and audit in the same transaction
                self.settle(s, who, row, new_state, now, grant_id,
                            extra={"signer": "api_key"})
        self.wakeups.notify(approval_id)
        if refused is not None:
            log.info("approval_refused", approval_id=approval_id, reason=refused.reason)
            raise refused
        log.info("approval_decided", approval_id=approval_id, state=row.state)
        return self._view(row, None, None)

    def settle(self, s: Session, who: Principal, row: ApprovalRequest,
               new_state: ApprovalState, now: datetime, grant_id: str | None, *,
               extra: Mapping[str, Any] | None = None, actor_role: str | None = None) -> None:
        """Write what a decision that won its conditional update entails, in ``s``.

        Approval issues the grant; the decision's audit entry carries ``extra`` (who signed
        and how: ``signer`` is ``api_key`` or ``passkey``, with the assertion for the latter).
        ``actor_role`` overrides the role recorded (``person`` for passkey decisions).  The
        caller has already moved the row out of ``pending``.
        """
        ids = {"approval_id": row.id, "session_id": row.session_id}
        body = {"params_hash": row.params_hash, **(extra or {})}
        batch: list[AuditRecord] = []
        if new_state is ApprovalState.APPROVED:
            assert grant_id is not None
            record = self._new_grant(s, who.tenant_id, row.session_id, row.id,
                                     row.decision_id, row.action, row.resource,
                                     row.params_hash, now, grant_id=grant_id)
            self._audit(s, who, AuditEvent.APPROVAL_APPROVE, "approved", object_ids=ids,
                        body=body, batch=batch)
            self._audit(s, who, AuditEvent.GRANT_ISSUE, "success",
                        object_ids={**ids, "grant_id": record.id},
                        body={"action": row.action, "params_hash": row.params_hash},
                        batch=batch)
            domain = _login_domain(row)
            if domain is not None:
                self._remember_domain(s, who.tenant_id, domain, row.session_id, now)
        else:
            self._audit(s, who, AuditEvent.APPROVAL_DENY, "denied", object_ids=ids, body=body,
                        batch=batch)
        if actor_role is not None:
            batch = [replace(r, actor_role=actor_role) for r in batch]
        enqueue(s, row.tenant_id, "approval.decided", {
            "approval_id": row.id, "state": new_state.value, "params_hash": row.params_hash,
            "signer": body.get("signer", "api_key")}, now)
        self._s.audit.append_many(batch, session=s)
        self._notify_db(s, row.id)
        row.state, row.decided_at, row.decided_by = new_state.value, now, who.key_id
        row.grant_id = grant_id

    def prepare_decision(self) -> None:
        """Load the grant signing key outside any transaction (see request_action)."""
        self._keyring.signing_key()

    def view(self, row: ApprovalRequest, state: ApprovalState | None = None) -> ApprovalView:
        """The request as an approver sees it (never with its grant)."""
        return self._view(row, None, None, state)

    def expire_if_due(self, s: Session, who: Principal, row: ApprovalRequest,
                      now: datetime) -> bool:
        """Write the expiry of a pending request past its deadline (audited)."""
        return self._expire(s, who, row, now)

    def notify_db(self, s: Session, approval_id: str) -> None:
        """Wake waiters in other processes when ``s`` commits."""
        self._notify_db(s, approval_id)

    async def wait(self, who: Principal, approval_id: str, timeout: float) -> ApprovalView:
        """Return as soon as the request leaves ``pending``, or at ``timeout`` seconds.

        Wakes on the in-process event set by whoever changed the state, on a PostgreSQL
        notification from another process, or (SQLite) at a bounded re-check interval.
        """
        settings = self._s.settings
        timeout = max(0.0, min(float(timeout), settings.approval_wait_max_seconds))
        if self._s.db.is_postgres:
            if self._listener is None:
                # Connecting may take a moment: not on the event loop.
                await anyio.to_thread.run_sync(self._ensure_listener)
            recheck = _PG_SAFETY_RECHECK
        else:
            recheck = settings.approval_recheck_seconds
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Subscribe before the first read, so a change between the read and the wait is seen.
        event = self.wakeups.subscribe(approval_id)
        try:
            while True:
                event.clear()
                view = await anyio.to_thread.run_sync(self.get_approval, who, approval_id)
                remaining = deadline - loop.time()
                if view.state is not ApprovalState.PENDING or remaining <= 0:
                    return view
                until_expiry = (view.expires_at - self._s.clock.now()).total_seconds()
                step = min(remaining, recheck, max(until_expiry, 0.05))
                try:
                    await asyncio.wait_for(event.wait(), timeout=step)
                except TimeoutError:
                    pass
        finally:
            self.wakeups.unsubscribe(approval_id, event)

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                return
            url = self._s.db.engine.url.set(drivername="postgresql")
            self._listener = PgListener(url.render_as_string(hide_password=False), self.wakeups)
            self._listener.start()

    def _send_webhook(self, who: Principal, approval: ApprovalView) -> None:
        if self._notifier is None:
            return
        self._notifier.submit({
            "type": "approval.requested",
            "tenant_id": who.tenant_id,
            "approval_id": approval.id,
            "action": approval.action,
            "short_code": approval.short_code,
            "params_hash": approval.params_hash,
            "expires_at": rfc3339(approval.expires_at),
            "approve_path": f"/approve/{approval.id}",
        })


def _key_aad(kid: str) -> bytes:
    return b"sandboxsec/v1/grant-signing-key\x00" + kid.encode("ascii")


def _rowcount(result: Any) -> int:
    # UPDATE results are CursorResults; their rowcount is what makes a transition one-winner.
    return int(cast(CursorResult[Any], result).rowcount)


def _lost_race() -> SandboxSecError:
    return ApprovalNotPendingError("another decision on this request landed first")


def _grant_ids(claims: GrantClaims) -> dict[str, str]:
    ids = {"grant_id": claims.grant_id, "session_id": claims.session_id}
    if claims.approval_id:
        ids["approval_id"] = claims.approval_id
    return ids


def _login_domain(row: ApprovalRequest) -> str | None:
    if row.action != "login":
        return None
    params = json.loads(row.params_json)
    if isinstance(params, dict) and isinstance(params.get("domain"), str):
        return _normalize_domain(params["domain"])
    kind, sep, value = row.resource.partition(":")
    return _normalize_domain(value) if sep and kind == "domain" else None


def _with_new_domain(ctx: ActionContext, new_domain: bool) -> ActionContext:
    return replace(ctx, new_domain=new_domain)
