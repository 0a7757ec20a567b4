"""Storing who an approval request is routed to, and reading it back (storage adapter).

The pure part (parsing route lines, resolving them to people) is
:mod:`sandboxsec.policy.routing`; this module runs it inside the transaction that creates the
request, so the request and the people it is routed to are written together.
"""

from __future__ import annotations

import json
from typing import Any

from sqlmodel import Session, col, select

from sandboxsec.errors import SandboxSecError
from sandboxsec.people.errors import ApprovalPersonRequiredError
from sandboxsec.people.models import ApprovalRoute, ApprovalVote, Person, SessionOwner
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.redecide import stricter_route
from sandboxsec.policy.routing import DEFAULT_ROUTE, Route, Signer, resolve

__all__ = [
    "PeopleRouting",
    "enabled_people",
    "key_approval_refusal",
    "load_route",
    "passkey_approvals",
    "required_route",
    "route_new_request",
    "routed_people",
    "session_owner",
]


def session_owner(s: Session, tenant_id: str, session_id: str) -> str | None:
    """The person id the session acts for, or ``None``."""
    row = s.exec(select(SessionOwner).where(SessionOwner.session_id == session_id,
                                            SessionOwner.tenant_id == tenant_id)).first()
    return row.person_id if row is not None else None


def enabled_people(s: Session, tenant_id: str) -> list[tuple[str, frozenset[str]]]:
    """Every enabled person of the tenant with their approver groups."""
    rows = s.exec(select(Person.id, Person.groups_json).where(
        Person.tenant_id == tenant_id, col(Person.disabled_at).is_(None))).all()
    return [(pid, frozenset(json.loads(groups))) for pid, groups in rows]


def route_new_request(s: Session, row: ApprovalRequest, route: Route | None) -> dict[str, Any]:
    """Resolve and store who decides ``row``; returns what the audit entry records."""
    route = route or DEFAULT_ROUTE
    owner = session_owner(s, row.tenant_id, row.session_id)
    people = resolve(route, owner, enabled_people(s, row.tenant_id))
    s.add(ApprovalRoute(approval_id=row.id, tenant_id=row.tenant_id, rule_id=row.rule_id,
                        owner_id=owner, people_json=json.dumps(list(people)),
                        quorum=route.quorum, signer=route.signer.value))
    return {"routed_to": list(people), "approvers": route.describe(), "quorum": route.quorum,
            "signer": route.signer.value, **({"owner_id": owner} if owner else {})}


def load_route(s: Session, tenant_id: str, approval_id: str) -> ApprovalRoute | None:
    """The stored route of a request (``None`` for requests older than routing)."""
    return s.exec(select(ApprovalRoute).where(ApprovalRoute.approval_id == approval_id,
                                              ApprovalRoute.tenant_id == tenant_id)).first()


def routed_people(route: ApprovalRoute | None) -> tuple[str, ...]:
    """The person ids a stored route names."""
    return tuple(json.loads(route.people_json)) if route is not None else ()


def passkey_approvals(s: Session, tenant_id: str, approval_id: str) -> int:
    """How many distinct people approved the request with their passkey (one vote each)."""
    rows = s.exec(select(ApprovalVote.person_id).where(
        ApprovalVote.tenant_id == tenant_id, ApprovalVote.approval_id == approval_id,
        ApprovalVote.decision == "approve")).all()
    return len(set(rows))


def required_route(stored: ApprovalRoute | None, now: Route | None) -> tuple[int, str]:
    """The quorum and signer a pending request needs: its stored route's, raised to what the
    policy in force now demands (``now``; see :func:`.redecide.stricter_route`)."""
    if stored is None:
        return stricter_route(DEFAULT_ROUTE.quorum, DEFAULT_ROUTE.signer.value, now)
    return stricter_route(stored.quorum, stored.signer, now)


def key_approval_refusal(s: Session, tenant_id: str, approval_id: str,
                         now: Route | None = None) -> SandboxSecError | None:
    """Why an approver API key may not approve this request, or ``None`` when it may."""
    quorum, signer = required_route(load_route(s, tenant_id, approval_id), now)
    if signer != Signer.KEY.value or quorum > 1:
        return ApprovalPersonRequiredError(
            "the policy requires a person to approve this request with their passkey")
    return None


class PeopleRouting:
    """The people domain's answer to the policy services' ``ApprovalRouting``."""

    def route(self, tx: Any, row: ApprovalRequest, route: Route | None) -> dict[str, Any]:
        """See :func:`route_new_request`."""
        return route_new_request(tx, row, route)

    def key_refusal(self, tx: Any, tenant_id: str, approval_id: str,
                    now: Route | None = None) -> SandboxSecError | None:
        """See :func:`key_approval_refusal`."""
        return key_approval_refusal(tx, tenant_id, approval_id, now)
