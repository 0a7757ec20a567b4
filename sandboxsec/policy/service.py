"""One handle on the policy services, for callers that want all of them.

Holds no logic: policy administration is :class:`~.admin.PolicyAdmin`'s, decisions
:class:`~.decisions.DecisionService`'s, approvals :class:`~.approval_service.ApprovalService`'s
and grants :class:`~.grant_service.GrantService`'s.  ``services.policy`` is this facade.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sandboxsec.policy.admin import PolicyAdmin
from sandboxsec.policy.approval_service import ApprovalService
from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState
from sandboxsec.policy.decisions import MAX_PENDING_PER_SESSION, DecisionService
from sandboxsec.policy.engine import CompiledPolicy, PolicyEngine
from sandboxsec.policy.grant_service import GrantService
from sandboxsec.policy.views import ActionResult, ApprovalView, GrantVerdict, PolicyView
from sandboxsec.policy.wakeup import Wakeups
from sandboxsec.principal import Principal

__all__ = [
    "MAX_PENDING_PER_SESSION",
    "ActionResult",
    "ApprovalView",
    "GrantVerdict",
    "PolicyService",
    "PolicyView",
]


class PolicyService:
    """Policy admin, decisions, approvals and grants behind one handle."""

    def __init__(self, admin: PolicyAdmin, decisions: DecisionService,
                 approvals: ApprovalService, grants: GrantService) -> None:
        self.admin = admin
        self.decisions = decisions
        self.approvals = approvals
        self.grants = grants

    @property
    def engine(self) -> PolicyEngine:
        """The policy engine decisions run on."""
        return self.decisions.engine

    @property
    def wakeups(self) -> Wakeups:
        """The in-process waiters on approval requests."""
        return self.approvals.wakeups

    def get_policy(self, who: Principal) -> PolicyView:
        """See :meth:`PolicyAdmin.get_policy`."""
        return self.admin.get_policy(who)

    def validate_policy(self, text_: str) -> CompiledPolicy:
        """See :meth:`PolicyAdmin.validate_policy`."""
        return self.admin.validate_policy(text_)

    def replace_policy(self, who: Principal, text_: str, *, base_version: int | None = None
                       ) -> PolicyView:
        """See :meth:`PolicyAdmin.replace_policy`."""
        return self.admin.replace_policy(who, text_, base_version=base_version)

    def request_action(self, who: Principal, *, session_id: str, action: str, resource: str,
                       params: Mapping[str, Any]) -> ActionResult:
        """See :meth:`DecisionService.request_action`."""
        return self.decisions.request_action(who, session_id=session_id, action=action,
                                             resource=resource, params=params)

    def list_approvals(self, who: Principal, *, state: ApprovalState | None = None,
                       session_id: str | None = None, limit: int = 50) -> list[ApprovalView]:
        """See :meth:`ApprovalService.list_approvals`."""
        return self.approvals.list_approvals(who, state=state, session_id=session_id,
                                             limit=limit)

    def get_approval(self, who: Principal, approval_id: str) -> ApprovalView:
        """See :meth:`ApprovalService.get_approval`."""
        return self.approvals.get_approval(who, approval_id)

    def decide(self, who: Principal, approval_id: str, event: ApprovalEvent,
               shown_params_hash: str) -> ApprovalView:
        """See :meth:`ApprovalService.decide`."""
        return self.approvals.decide(who, approval_id, event, shown_params_hash)

    async def wait(self, who: Principal, approval_id: str, timeout: float) -> ApprovalView:
        """See :meth:`ApprovalService.wait`."""
        return await self.approvals.wait(who, approval_id, timeout)

    def _ensure_listener(self) -> None:
        self.approvals._ensure_listener()

    def public_keys(self) -> dict[str, bytes]:
        """See :meth:`GrantService.public_keys`."""
        return self.grants.public_keys()

    def verify_grant(self, who: Principal, *, token: str, action: str,
                     params: Mapping[str, Any], resource: str | None = None) -> GrantVerdict:
        """See :meth:`GrantService.verify_grant`."""
        return self.grants.verify_grant(who, token=token, action=action, params=params,
                                        resource=resource)

    def close(self) -> None:
        """Stop the LISTEN thread and the webhook sender."""
        self.approvals.close()
        self.decisions.close()
