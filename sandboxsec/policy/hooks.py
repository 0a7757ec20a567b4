"""What the policy services ask of the domains built on them, as Protocols.

The people domain decides who an approval request goes to, and the webhooks domain announces
changes; both sit above (or beside) policy, so policy names only these two small interfaces
and the composition root hands it the implementations (``sandboxsec.people.routes`` and
``sandboxsec.webhooks.outbox``).  Both act inside the caller's transaction ``tx``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from sandboxsec.errors import SandboxSecError
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.routing import Route

__all__ = ["ApprovalRouting", "Outbox"]


class ApprovalRouting(Protocol):
    """Who decides an approval request, fixed when it is created."""

    def route(self, tx: Any, row: ApprovalRequest, route: Route | None) -> dict[str, Any]:
        """Resolve and store the people ``row`` is routed to; returns what the audit records."""
        ...

    def key_refusal(self, tx: Any, tenant_id: str, approval_id: str,
                    now: Route | None = None) -> SandboxSecError | None:
        """Why an approver API key may not approve this request (``None``: it may).

        ``now`` is the route the policy in force now gives it (it can only add demands)."""
        ...


class Outbox(Protocol):
    """Announces a change to the tenant's webhooks, in the transaction of the change."""

    def enqueue(self, tx: Any, tenant_id: str, event_type: str, data: Mapping[str, Any],
                now: datetime) -> int:
        """Queue ``event_type`` for every enabled webhook of the tenant; returns how many."""
        ...
