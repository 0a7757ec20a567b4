"""The policy in force now, applied to what is in flight (see :mod:`.redecide`).

Approving a request and using a grant both ask this service whether the tenant's policy in
force *now* still lets them through; it builds the action's context exactly as the first
decision did (:func:`~sandboxsec.policy.context.action_context`) and decides it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from sandboxsec.errors import SandboxSecError
from sandboxsec.policy.context import SessionFacts, action_context, session_facts
from sandboxsec.policy.engine import ActionContext, CompiledPolicy, PolicyEngine
from sandboxsec.policy.models import ApprovalRequest, GrantRecord
from sandboxsec.policy.redecide import reconsider_grant, reconsider_pending, route_now
from sandboxsec.policy.repository import PolicyRepository, Tx
from sandboxsec.policy.routing import Route
from sandboxsec.principal import Role
from sandboxsec.sessions.models import AgentSession

__all__ = ["PolicyInForce"]


class PolicyInForce:
    """Decides pending requests and grants again under the tenant's policy in force now."""

    def __init__(self, repo: PolicyRepository, engine: PolicyEngine,
                 texts: Callable[[str, int], str],
                 passkeys: Callable[[Tx, str, str], int] | None = None) -> None:
        """``texts(tenant_id, version)`` is the text of a policy version (policy admin);
        ``passkeys(tx, tenant_id, approval_id)`` counts the people who approved a request with
        their passkey (the people domain), so a grant approved by an approver key, or by fewer
        people than a route now asks for, is refused."""
        self._passkeys = passkeys
        self._repo = repo
        self._engine = engine
        self._texts = texts

    def _policy(self, tx: Tx, tenant_id: str) -> tuple[int, CompiledPolicy]:
        version = self._repo.current_version(tx, tenant_id)
        return version, self._engine.policy_for(
            tenant_id, version, lambda: self._texts(tenant_id, version))

    def _login_seen(self, tx: Tx, ctx: ActionContext) -> ActionContext:
        if ctx.action != "login" or ctx.domain is None:
            return ctx
        return replace(ctx, new_domain=not self._repo.domain_seen(tx, ctx.tenant_id,
                                                                   ctx.domain))

    def _request_context(self, row: ApprovalRequest) -> ActionContext:
        # The session facts are the ones the request was made under (stored on the row);
        # only agent keys request actions, so the role is the agent's.
        facts = SessionFacts(row.session_id, bool(row.attested), row.image_name,
                             row.image_digest)
        return action_context(tenant_id=row.tenant_id, role=str(Role.AGENT), session=facts,
                              action=row.action, resource=row.resource,
                              params=json.loads(row.params_json))

    def approval_refusal(self, tx: Tx, row: ApprovalRequest) -> str | None:
        """Why the policy in force refuses this pending request now (``None``: it does not).

        The session facts are the ones the request was made under (stored on the row).
        """
        version, policy = self._policy(tx, row.tenant_id)
        try:
            ctx = self._request_context(row)
        except SandboxSecError as exc:
            return f"the request no longer passes the input checks ({exc.reason})"
        why = reconsider_pending(policy, self._login_seen(tx, ctx))
        return why.explain("request", version) if why is not None else None

    def approval_route(self, tx: Tx, row: ApprovalRequest) -> Route | None:
        """The route the policy in force now gives this pending request (``None`` when it
        does not require approval now; :meth:`approval_refusal` covers a deny)."""
        _version, policy = self._policy(tx, row.tenant_id)
        try:
            ctx = self._request_context(row)
        except SandboxSecError:
            return None  # refused by approval_refusal
        return route_now(policy, self._login_seen(tx, ctx))

    def grant_refusal(self, tx: Tx, record: GrantRecord, session: AgentSession,
                      params: Mapping[str, Any]) -> str | None:
        """Why the policy in force refuses this grant's use now (``None``: it does not)."""
        version, policy = self._policy(tx, record.tenant_id)
        try:
            ctx = action_context(tenant_id=record.tenant_id, role=str(Role.AGENT),
                                 session=session_facts(session), action=record.action,
                                 resource=record.resource, params=params)
        except SandboxSecError as exc:
            return f"the granted action no longer passes the input checks ({exc.reason})"
        passkeys = None
        if self._passkeys is not None and record.approval_id is not None:
            passkeys = self._passkeys(tx, record.tenant_id, record.approval_id)
        why = reconsider_grant(policy, self._login_seen(tx, ctx),
                               approved_by_person=record.approval_id is not None,
                               passkeys=passkeys)
        return why.explain("grant", version) if why is not None else None
