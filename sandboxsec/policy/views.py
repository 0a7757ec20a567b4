"""What the policy services hand out: frozen views, never ORM rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.policy.engine import Decision
from sandboxsec.policy.models import ApprovalRequest

__all__ = ["ActionResult", "ApprovalView", "GrantVerdict", "PolicyView", "approval_view"]


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


class ApprovalView(BaseModel):
    """An approval request as its tenant's agent or approver sees it.

    A frozen pydantic model, so the HTTP answer is this view itself (``ApprovalOut`` of
    ``api/routes/approvals.py`` only adds documentation): the fields are written once."""

    model_config = ConfigDict(frozen=True)

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
    decided_at: datetime | None = None
    decided_by: str | None = None
    grant: str | None = None
    grant_expires_at: datetime | None = None


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
    #: the canonical resource the policy decided on (see policy/target.py)
    resource: str = ""


class GrantVerdict(BaseModel):
    """A grant that verified (and is now used); also the body of the HTTP answer."""

    model_config = ConfigDict(frozen=True)

    grant_id: str
    session_id: str
    approval_id: str | None
    action: str
    resource: str
    params_hash: str
    expires_at: datetime
    used_at: datetime


def approval_view(row: ApprovalRequest, grant: str | None = None,
                  grant_expires: datetime | None = None,
                  state: ApprovalState | None = None) -> ApprovalView:
    """The view of a stored request (``state`` overrides the stored one: as of now)."""
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
