"""Decisions on agent actions: allow (with a grant), deny, or open an approval request.

The rules are the pure :class:`~sandboxsec.policy.engine.PolicyEngine`'s; this service checks
the input, reads the session and the tenant's policy version in force, and stores the
decision with the approval request or grant it creates, audited in one transaction.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock, rfc3339
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.policy.canonical import canonical_json, params_hash, short_code
from sandboxsec.policy.config import PolicyConfig
from sandboxsec.policy.context import action_context, session_facts
from sandboxsec.policy.engine import ActionContext, Decision, Outcome, PolicyEngine
from sandboxsec.policy.errors import (
    ActionInvalidError,
    ActionSessionExpiredError,
    ApprovalPendingLimitError,
)
from sandboxsec.policy.grant_service import GrantIssuer
from sandboxsec.policy.hooks import ApprovalRouting, Outbox
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.repository import DecidingSession, PolicyRepository, Tx
from sandboxsec.policy.views import ActionResult, ApprovalView, approval_view
from sandboxsec.principal import Principal
from sandboxsec.sessions.liveness import is_live

__all__ = ["MAX_PENDING_PER_SESSION", "ApprovalNotifier", "DecisionService", "PolicyTexts"]

log = structlog.get_logger("sandboxsec.policy")

_ACTION = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
#: Pending approval requests one session may have open at once.  A flood of requests is how
#: an agent wears a person down until they approve without reading (approval fatigue).
MAX_PENDING_PER_SESSION = 10


class PolicyTexts(Protocol):
    """Where a tenant's policy text of a given version comes from (policy admin)."""

    def text(self, tenant_id: str, version: int) -> str:
        """The text of version ``version`` (0: the shipped default)."""
        ...


class ApprovalNotifier(Protocol):
    """Tells the approver that a request is waiting (the webhook sender)."""

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` for delivery; never blocks the agent."""
        ...

    def close(self) -> None:
        """Stop delivering."""
        ...


class DecisionService:
    """Decides agent actions for every tenant."""

    def __init__(self, repo: PolicyRepository, clock: Clock, audit: AuditSink,
                 engine: PolicyEngine, policies: PolicyTexts, grants: GrantIssuer,
                 config: PolicyConfig, notifier: ApprovalNotifier | None = None, *,
                 routing: ApprovalRouting | None = None, outbox: Outbox | None = None) -> None:
        """``routing`` resolves who decides a new approval request (without it: anyone of
        the tenant, approver keys allowed); ``outbox`` announces it to the tenant's webhooks."""
        self._routing = routing
        self._outbox = outbox
        self._repo = repo
        self._clock = clock
        self._audit = audit
        self.engine = engine
        self._policies = policies
        self._grants = grants
        self._config = config
        self._notifier = notifier

    def close(self) -> None:
        """Stop the webhook sender."""
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None

    def _context(self, who: Principal, session: DecidingSession, action: str, resource: str,
                 params: Mapping[str, Any]) -> ActionContext:
        return action_context(tenant_id=who.tenant_id, role=str(who.role),
                              session=session_facts(session), action=action,
                              resource=resource, params=params)

    def request_action(self, who: Principal, *, session_id: str, action: str, resource: str,
                       params: Mapping[str, Any],
                       claim: Callable[[Tx], None] | None = None) -> ActionResult:
        """Decide one action of an agent; approval_required opens an approval request.

        ``claim`` runs last in the decision's transaction: the session proof's single-use
        mark (:meth:`sandboxsec.sessions.binding.SessionBinding.acting`), which then commits
        with the decision or not at all.

        1. the input is well formed and the params have a canonical form;
        2. the session is this tenant's and still live;
        3. the tenant's policy in force (version read per decision) decides;
        4. the decision, and the approval request or grant it creates, are stored and audited
           in one transaction.
        """
        now = self._clock.now()
        # 1. input
        if not isinstance(action, str) or not _ACTION.fullmatch(action):
            raise ActionInvalidError("action must match [a-z][a-z0-9_.-]{0,63}")
        canonical = canonical_json(params)
        p_hash = params_hash(params)
        code = short_code(p_hash)
        self._grants.prepare()
        refused: SandboxSecError | None = None
        result: ActionResult | None = None
        with self._repo.transaction() as tx:
            # 2. session
            # The session and the policy version in force: one read.
            session, version = self._repo.deciding_session(tx, who.tenant_id, session_id)
            if not is_live(session, now):
                refused = ActionSessionExpiredError("the session has expired or ended")
                self._audit.append(
                    AuditRecord.by(who, AuditEvent.POLICY_DECISION, "deny",
                                   reason=refused.reason, object_ids={"session_id": session.id},
                                   body={"action": action, "params_hash": p_hash}),
                    session=tx,
                )
            else:
                ctx = self._context(who, session, action, resource, params)
                if ctx.domain is not None and action == "login":
                    ctx = replace(ctx, new_domain=not self._repo.domain_seen(
                        tx, who.tenant_id, ctx.domain))
                # 3. decide under the version in force right now (read with the session)
                decision = self.engine.decide(
                    ctx, version=version,
                    load_text=lambda: self._policies.text(who.tenant_id, version),
                    decision_id=new_id("dec"),
                )
                # 4. persist (an agent retrying asks the approver once; a flood is refused)
                existing: ApprovalRequest | None = None
                if decision.outcome is Outcome.APPROVAL_REQUIRED:
                    # The count and the insert below are one atomic step.
                    self._repo.lock_session(tx, who.tenant_id, session.id)
                    pending = self._repo.pending_approvals(tx, who.tenant_id, session.id, now)
                    existing = next((p for p in pending if (p.action, p.resource, p.params_hash)
                                     == (action, ctx.resource, p_hash)), None)
                    if existing is None and len(pending) >= MAX_PENDING_PER_SESSION:
                        refused = ApprovalPendingLimitError(
                            f"this session already has {len(pending)} pending approval requests"
                        )
                        self._audit.append(
                            AuditRecord.by(who, AuditEvent.POLICY_DECISION, "deny",
                                           reason=refused.reason,
                                           object_ids={"session_id": session.id,
                                                       "decision_id": decision.decision_id},
                                           body={"action": action, "params_hash": p_hash,
                                                 "rule_id": decision.rule_id}),
                            session=tx,
                        )
                if refused is None:
                    result = self._record_decision(tx, who, session, ctx, decision, canonical,
                                                   p_hash, code, now, existing)
            if claim is not None:  # last: the writer lock is not held across the decision
                claim(tx)
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

    def _record_decision(self, tx: Tx, who: Principal, session: DecidingSession,
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
            approval = approval_view(existing)
        elif decision.outcome is Outcome.APPROVAL_REQUIRED:
            row = ApprovalRequest(
                id=new_id("apr"), tenant_id=who.tenant_id, session_id=session.id,
                action=ctx.action, resource=ctx.resource, params_json=canonical.decode("utf-8"),
                params_hash=p_hash, short_code=code, state=ApprovalState.PENDING.value,
                requested_by=who.key_id, decision_id=decision.decision_id,
                rule_id=decision.rule_id, reason=decision.explanation[:1000],
                image_name=session.image_name, image_digest=session.image_digest,
                attested=bool(session.attested), created_at=now,
                expires_at=now + timedelta(seconds=self._config.approval_ttl_seconds),
            )
            self._repo.add_approval(tx, row)
            object_ids["approval_id"] = row.id
            approval = approval_view(row)
            if self._routing is not None:
                compiled = self.engine.policy_for(
                    who.tenant_id, decision.policy_version,
                    lambda: self._policies.text(who.tenant_id, decision.policy_version))
                routed = self._routing.route(tx, row, compiled.routes.get(decision.rule_id))
            if self._outbox is not None:
                # Announced from the tenant's webhook outbox, in this same transaction.
                self._outbox.enqueue(tx, who.tenant_id, "approval.requested", {
                    "approval_id": row.id, "action": row.action, "short_code": row.short_code,
                    "expires_at": rfc3339(row.expires_at),
                    "routed_to": routed.get("routed_to", []),
                    "approve_path": f"/approve/{row.id}"}, now)
        elif decision.outcome is Outcome.ALLOW:
            record, grant = self._grants.issue_signed(
                tx, tenant_id=who.tenant_id, session_id=session.id,
                decision_id=decision.decision_id, action=ctx.action, resource=ctx.resource,
                p_hash=p_hash, now=now)
            grant_expires = record.expires_at
            object_ids["grant_id"] = record.id
            if ctx.action == "login" and ctx.domain is not None:
                self._repo.remember_domain(tx, who.tenant_id, ctx.domain, session.id, now)
        # One append for the whole decision: one lock of the log head instead of several.
        batch = [AuditRecord.by(who, AuditEvent.POLICY_DECISION, decision.outcome.value,
                                reason=decision.rule_id, object_ids=object_ids, body=body,
                                sensitive=sensitive)]
        if approval is not None and existing is None:
            batch.append(AuditRecord.by(
                who, AuditEvent.APPROVAL_REQUEST, "pending",
                object_ids={"approval_id": approval.id, "session_id": session.id},
                body={"action": ctx.action, "params_hash": p_hash,
                      "expires_at": rfc3339(approval.expires_at), **routed},
                sensitive=sensitive))
        if grant is not None:
            batch.append(AuditRecord.by(
                who, AuditEvent.GRANT_ISSUE, "success",
                object_ids={"grant_id": object_ids["grant_id"], "session_id": session.id},
                body={"action": ctx.action, "params_hash": p_hash}))
        self._audit.append_many(batch, session=tx)
        return ActionResult(decision, p_hash, code, approval, grant, grant_expires,
                            new_approval=approval is not None and existing is None,
                            resource=ctx.resource)

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
