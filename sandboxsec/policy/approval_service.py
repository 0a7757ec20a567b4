"""Approval requests: listing, reading, the approver's decision, and waiting for one.

The state machine is pure (:mod:`.approvals`); this service applies its transitions with the
repository's one-winner updates, issues the grant of an approval in the same transaction,
audits every decision and every refusal, and wakes agents waiting on a request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import structlog

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock, rfc3339
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.policy.approvals import (
    ApprovalEvent,
    ApprovalState,
    check_decision,
    effective_state,
)
from sandboxsec.policy.config import ApprovalConfig
from sandboxsec.policy.errors import (
    ApprovalExpiredError,
    ApprovalNotPendingError,
    ApprovalPolicyDeniedError,
)
from sandboxsec.policy.grant_service import GrantIssuer
from sandboxsec.policy.hooks import ApprovalRouting, Outbox
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.repository import PolicyRepository, Tx
from sandboxsec.policy.routing import Route
from sandboxsec.policy.target import canonical_domain, resolve_target
from sandboxsec.policy.views import ApprovalView, approval_view
from sandboxsec.policy.wakeup import Wakeups
from sandboxsec.principal import Principal, Role

if TYPE_CHECKING:
    from sandboxsec.policy.in_force import PolicyInForce

__all__ = ["POLICY_DECIDER", "ApprovalService", "Listener", "login_domain", "normalize_domain"]

log = structlog.get_logger("sandboxsec.policy")

# When no SQLite recheck applies (PostgreSQL), waiters still re-read this often in case a
# notification was lost while the listener reconnected.
_PG_SAFETY_RECHECK = 10.0
#: ``decided_by`` of a request denied because the policy in force denies it.
POLICY_DECIDER = "policy"
#: Pending requests one policy change re-decides at once (each tenant holds at most 10 per
#: live session; the rest are caught when approved).
_SWEEP_LIMIT = 10_000


class Listener(Protocol):
    """Forwards state changes made by other processes to :class:`Wakeups`."""

    def start(self, wait_seconds: float = 5.0) -> bool:
        """Start listening; True once listening."""
        ...

    def stop(self) -> None:
        """Stop listening."""
        ...


def normalize_domain(value: str) -> str:
    """A domain name as rules and the login-domain table compare it (its canonical form,
    :func:`~sandboxsec.policy.target.canonical_domain`; the value as given when it has none)."""
    try:
        return canonical_domain(value)
    except SandboxSecError:
        return value


def login_domain(row: ApprovalRequest) -> str | None:
    """The domain a login request logs in to (None for other actions)."""
    if row.action != "login":
        return None
    try:
        return resolve_target(row.action, row.resource, json.loads(row.params_json)).value
    except SandboxSecError:
        return None


class ApprovalService:
    """Lists, shows and decides approval requests, and lets agents wait for a decision."""

    def __init__(self, repo: PolicyRepository, clock: Clock, audit: AuditSink,
                 grants: GrantIssuer, wakeups: Wakeups, config: ApprovalConfig,
                 listener_factory: Callable[[], Listener] | None = None,
                 in_force: PolicyInForce | None = None, *,
                 routing: ApprovalRouting | None = None, outbox: Outbox | None = None) -> None:
        """``listener_factory`` is given when other processes can announce changes
        (PostgreSQL); without it, waiters re-read at ``config.recheck_seconds``.
        ``in_force`` decides a request again under the policy in force when it is approved
        (see policy/redecide.py); ``routing`` says when an approver key may not approve (a
        person must); ``outbox`` announces decisions to the tenant's webhooks."""
        self._routing = routing
        self._outbox = outbox
        self._repo = repo
        self._clock = clock
        self._audit = audit
        self._grants = grants
        self.wakeups = wakeups
        self._config = config
        self._listener_factory = listener_factory
        self._in_force = in_force
        self._listener: Listener | None = None
        self._listener_lock = threading.Lock()

    def close(self) -> None:
        """Stop the LISTEN thread."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None

    def _expire(self, tx: Tx, who: Principal, row: ApprovalRequest, now: datetime) -> bool:
        """Write the expiry of a pending request past its deadline (conditional, audited)."""
        won = self._repo.expire_approval(tx, row.tenant_id, row.id, now)
        if won:
            self._audit.append(
                AuditRecord.by(who, AuditEvent.APPROVAL_EXPIRE, "expired",
                               object_ids={"approval_id": row.id, "session_id": row.session_id},
                               body={"expires_at": rfc3339(row.expires_at)}),
                session=tx,
            )
            self._repo.announce(tx, row.id)
            row.state = ApprovalState.EXPIRED.value
        return won

    def _policy_deny(self, tx: Tx, who: Principal, row: ApprovalRequest, now: datetime,
                     why: str) -> bool:
        """Deny a pending request the policy in force denies (conditional, audited)."""
        won = self._repo.decide_approval(tx, row.tenant_id, row.id, ApprovalState.DENIED, now,
                                         POLICY_DECIDER, None)
        if won:
            self._audit.append(
                AuditRecord.by(who, AuditEvent.APPROVAL_DENY, "denied",
                               reason=ApprovalPolicyDeniedError.code,
                               object_ids={"approval_id": row.id, "session_id": row.session_id},
                               body={"params_hash": row.params_hash, "message": why[:500]}),
                session=tx,
            )
            if self._outbox is not None:
                self._outbox.enqueue(tx, row.tenant_id, "approval.decided", {
                    "approval_id": row.id, "state": ApprovalState.DENIED.value,
                    "signer": POLICY_DECIDER}, now)
            self._repo.announce(tx, row.id)
            row.state, row.decided_at, row.decided_by = (ApprovalState.DENIED.value, now,
                                                         POLICY_DECIDER)
        return won

    def policy_refusal(self, tx: Tx, who: Principal, row: ApprovalRequest, now: datetime
                       ) -> ApprovalPolicyDeniedError | None:
        """Before an approval takes effect (by key, or a person's vote): when the policy in
        force now denies the pending request, deny it in ``tx`` (audited) and return the
        refusal to raise once ``tx`` has committed; ``None`` when it may still be approved."""
        if (self._in_force is None or row.state != ApprovalState.PENDING.value
                or now >= row.expires_at):
            return None
        why = self._in_force.approval_refusal(tx, row)
        if why is None:
            return None
        self._policy_deny(tx, who, row, now, why)
        return ApprovalPolicyDeniedError(why)

    def route_now(self, tx: Tx, row: ApprovalRequest) -> Route | None:
        """The route the policy in force now gives a pending request (``None``: no policy
        in force is wired, or it no longer requires approval)."""
        return self._in_force.approval_route(tx, row) if self._in_force is not None else None

    def sweep_pending(self, who: Principal) -> None:
        """After a policy change: deny every pending request the new policy denies.

        Approving decides again too (``decide``), so this sweep only makes the change
        visible at once (lists, waiting agents); if it fails, nothing gets approved that the
        policy denies.
        """
        if self._in_force is None:
            return
        now = self._clock.now()
        denied: list[str] = []
        try:
            rows = self._repo.list_approvals(who.tenant_id, state=ApprovalState.PENDING,
                                             session_id=None, limit=_SWEEP_LIMIT, now=now)
            with self._repo.transaction() as tx:
                for row in rows:
                    why = self._in_force.approval_refusal(tx, row)
                    if why is not None and self._policy_deny(tx, who, row, now, why):
                        denied.append(row.id)
        except SandboxSecError as exc:
            log.warning("policy_sweep_failed", reason=exc.reason)
            return
        for approval_id in denied:
            self.wakeups.notify(approval_id)
        if denied:
            log.info("policy_sweep", denied=len(denied))

    def list_approvals(self, who: Principal, *, state: ApprovalState | None = None,
                       session_id: str | None = None, limit: int = 50) -> list[ApprovalView]:
        """The tenant's approval requests, newest first (never with grants).

        States are as of now: a pending request past its expiry is listed as ``expired``
        (the expiry itself is written when the request is next read or decided).
        """
        now = self._clock.now()
        rows = self._repo.list_approvals(who.tenant_id, state=state, session_id=session_id,
                                         limit=max(1, min(limit, 200)), now=now)
        return [approval_view(r, state=effective_state(ApprovalState(r.state), r.expires_at,
                                                       now))
                for r in rows]

    def get_approval(self, who: Principal, approval_id: str) -> ApprovalView:
        """The request as ``who`` may see it; the agent key that asked also gets its grant."""
        now = self._clock.now()
        expired = False
        if who.role is Role.AGENT:
            self._grants.prepare()
        with self._repo.transaction() as tx:
            row = self._repo.approval(tx, who.tenant_id, approval_id)
            if effective_state(ApprovalState(row.state), row.expires_at, now) is not \
                    ApprovalState(row.state):
                expired = self._expire(tx, who, row, now)
            grant = grant_expires = None
            # The grant goes only to the agent key that asked: an approver (or another agent
            # of the tenant) can read the request but never lift its grant.
            if (who.role is Role.AGENT and who.key_id == row.requested_by
                    and row.state == ApprovalState.APPROVED.value and row.grant_id is not None):
                record = self._repo.find_grant(tx, who.tenant_id, row.grant_id)
                if record is not None and record.used_at is None and now < record.expires_at:
                    grant = self._grants.token(record, row.params_hash)
                    grant_expires = record.expires_at
        if expired:
            self.wakeups.notify(row.id)
        return approval_view(row, grant, grant_expires)

    def decide(self, who: Principal, approval_id: str, event: ApprovalEvent,
               shown_params_hash: str) -> ApprovalView:
        """The approver approves or denies exactly what they were shown.

        0. an approval is decided again under the policy in force now: if it denies the
           request, the request is denied (``approval_policy_denied``);
        1. the request is this tenant's (404 otherwise), pending and not expired;
        2. ``shown_params_hash`` equals the request's;
        3. the state changes with a conditional update on ``pending``: of two concurrent
           decisions exactly one wins, the other is refused;
        4. approval issues the grant; state change, grant and audit commit together.
        Refusals are audited too, and change nothing.
        """
        now = self._clock.now()
        self._grants.prepare()
        refused: SandboxSecError | None = None
        with self._repo.transaction() as tx:
            # 1.-2. pure checks on the current row
            row = self._repo.approval(tx, who.tenant_id, approval_id)
            if event is ApprovalEvent.APPROVE:
                # 0. the policy in force now still lets a person approve this
                refused = self.policy_refusal(tx, who, row, now)
            try:
                new_state = check_decision(
                    state=ApprovalState(row.state), event=event, expires_at=row.expires_at,
                    now=now, shown_params_hash=shown_params_hash, params_hash=row.params_hash,
                )
            except SandboxSecError as exc:
                refused = refused or exc
                if isinstance(exc, ApprovalExpiredError):
                    self._expire(tx, who, row, now)
            if refused is None and event is ApprovalEvent.APPROVE and self._routing is not None:
                # 2b. the policy may demand a person's passkey (keys then only deny); a quorum
                #     is only ever met by people
                refused = self._routing.key_refusal(tx, who.tenant_id, row.id,
                                                    self.route_now(tx, row))
            if refused is None:
                # 3. one winner
                grant_id = new_id("gr") if new_state is ApprovalState.APPROVED else None
                if not self._repo.decide_approval(tx, who.tenant_id, row.id, new_state, now,
                                                  who.key_id, grant_id):
                    refused = ApprovalNotPendingError(
                        "another decision on this request landed first")
            ids = {"approval_id": row.id, "session_id": row.session_id}
            if refused is not None:
                self._audit.append(
                    AuditRecord.by(who, AuditEvent.APPROVAL_REFUSE, "refused",
                                   reason=refused.reason, object_ids=ids,
                                   body={"attempted": event.value}),
                    session=tx,
                )
            else:
                # 4. grant and audit in the same transaction
                self.settle(tx, who, row, new_state, now, grant_id,
                            extra={"signer": "api_key"})
        self.wakeups.notify(approval_id)
        if refused is not None:
            log.info("approval_refused", approval_id=approval_id, reason=refused.reason)
            raise refused
        log.info("approval_decided", approval_id=approval_id, state=row.state)
        return approval_view(row)

    def settle(self, tx: Tx, who: Principal, row: ApprovalRequest, new_state: ApprovalState,
               now: datetime, grant_id: str | None, *, extra: Mapping[str, Any] | None = None,
               actor_role: str | None = None) -> None:
        """Write what a decision that won its conditional update entails, in ``tx``.

        Approval issues the grant; the decision's audit entry carries ``extra`` (who signed
        and how: ``signer`` is ``api_key`` or ``passkey``, with the assertion for the latter);
        ``actor_role`` overrides the role recorded (``person`` for passkey decisions).  The
        caller has already moved the row out of ``pending``.
        """
        ids = {"approval_id": row.id, "session_id": row.session_id}
        body = {"params_hash": row.params_hash, **(extra or {})}
        batch: list[AuditRecord] = []
        if new_state is ApprovalState.APPROVED:
            assert grant_id is not None
            record = self._grants.issue(
                tx, tenant_id=who.tenant_id, session_id=row.session_id, approval_id=row.id,
                decision_id=row.decision_id, action=row.action, resource=row.resource,
                p_hash=row.params_hash, now=now, grant_id=grant_id)
            batch.append(AuditRecord.by(who, AuditEvent.APPROVAL_APPROVE, "approved",
                                        object_ids=ids, body=body))
            batch.append(AuditRecord.by(who, AuditEvent.GRANT_ISSUE, "success",
                                        object_ids={**ids, "grant_id": record.id},
                                        body={"action": row.action,
                                              "params_hash": row.params_hash}))
            domain = login_domain(row)
            if domain is not None:
                self._repo.remember_domain(tx, who.tenant_id, domain, row.session_id, now)
        else:
            batch.append(AuditRecord.by(who, AuditEvent.APPROVAL_DENY, "denied",
                                        object_ids=ids, body=body))
        if actor_role is not None:
            batch = [replace(r, actor_role=actor_role) for r in batch]
        # One append for the decision: one lock of the log head instead of two.
        self._audit.append_many(batch, session=tx)
        if self._outbox is not None:
            # No params hash: a hash of low-entropy payment params is guessable, and the
            # receiver has the approval id.
            self._outbox.enqueue(tx, row.tenant_id, "approval.decided", {
                "approval_id": row.id, "state": new_state.value,
                "signer": body.get("signer", "api_key")}, now)
        self._repo.announce(tx, row.id)
        row.state, row.decided_at, row.decided_by = new_state.value, now, who.key_id
        row.grant_id = grant_id

    def prepare_decision(self) -> None:
        """Load the grant signing key outside any transaction (before ``settle``)."""
        self._grants.prepare()

    def expire_if_due(self, tx: Tx, who: Principal, row: ApprovalRequest,
                      now: datetime) -> bool:
        """Write the expiry of a pending request past its deadline (audited)."""
        return self._expire(tx, who, row, now)

    def announce(self, tx: Tx, approval_id: str) -> None:
        """Wake waiters in other processes when ``tx`` commits."""
        self._repo.announce(tx, approval_id)

    async def wait(self, who: Principal, approval_id: str, timeout: float) -> ApprovalView:
        """Return as soon as the request leaves ``pending``, or at ``timeout`` seconds.

        Wakes on the in-process event set by whoever changed the state, on a notification
        from another process (PostgreSQL), or at a bounded re-check interval.
        """
        timeout = max(0.0, min(float(timeout), self._config.wait_max_seconds))
        if self._listener_factory is not None:
            if self._listener is None:
                # Connecting may take a moment: not on the event loop.
                await anyio.to_thread.run_sync(self._ensure_listener)
            recheck = _PG_SAFETY_RECHECK
        else:
            recheck = self._config.recheck_seconds
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
                until_expiry = (view.expires_at - self._clock.now()).total_seconds()
                step = min(remaining, recheck, max(until_expiry, 0.05))
                try:
                    await asyncio.wait_for(event.wait(), timeout=step)
                except TimeoutError:
                    pass
        finally:
            self.wakeups.unsubscribe(approval_id, event)

    def _ensure_listener(self) -> None:
        with self._listener_lock:
            if self._listener is not None or self._listener_factory is None:
                return
            self._listener = self._listener_factory()
            self._listener.start()
