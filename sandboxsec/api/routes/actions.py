"""Routes: ``POST /v1/actions``, where every agent action is decided before it runs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.api.session_proof import ProofDep
from sandboxsec.metrics import DECISIONS
from sandboxsec.policy.canonical import canonical_json
from sandboxsec.policy.engine import Outcome
from sandboxsec.principal import Principal

__all__ = ["ActionIn", "ActionOut", "router"]

router = APIRouter(tags=["actions"])


class ActionIn(BaseModel):
    """An action an agent wants to take, with its exact parameters."""

    model_config = ConfigDict(extra="forbid")

    session_id: str = Field(min_length=1, max_length=64)
    action: str = Field(min_length=1, max_length=64, examples=["payment"])
    resource: str = Field(min_length=1, max_length=512, examples=["payee:acme-gmbh"])
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Exact parameters. Amounts are decimal strings (\"125.50\"); floats are "
        "refused. params_hash is SHA-256 of their canonical JSON (docs/policy.md).",
        examples=[{"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh"}],
    )


class ActionOut(BaseModel):
    """The decision, the rule that made it, and what follows from it."""

    decision: Outcome
    reason: str = Field(description="Which rule decided, in words.")
    rule_id: str
    decision_id: str
    policy_version: int
    params_hash: str
    short_code: str = Field(description="Shown to the approver too, for comparison.")
    resource: str | None = Field(
        default=None, description="The canonical target the policy decided on (docs/policy.md: "
        "one target per action, domains in lower-case A-label form).")
    approval_id: str | None = None
    approval_url: str | None = Field(default=None, description="Path of the approval page.")
    expires_at: datetime | None = Field(default=None, description="Expiry of the approval.")
    grant: str | None = Field(default=None, description="Single-use grant (allow decisions).")
    grant_expires_at: datetime | None = None


@router.post("/actions", response_model=ActionOut, response_model_exclude_none=True)
def request_action(body: ActionIn, services: ServicesDep,
                   who: Annotated[Principal, Depends(require("action:request"))],
                   proof: ProofDep) -> ActionOut:
    """Decide an action: ``allow`` (with a grant), ``deny``, or ``approval_required``.

    The request carries a ``DPoP`` proof by the session's TPM-held key, checked after the
    body's own shape (params that cannot be canonicalised are a 4xx whatever the session)."""
    canonical_json(body.params)
    # The proof's single-use mark commits in the decision's own transaction, which holds
    # every effect of the decision: its signature is checked meanwhile (overlap).
    result = services.session_binding.acting(
        who, proof, body.session_id,
        lambda claim: services.decisions.request_action(
            who, session_id=body.session_id, action=body.action, resource=body.resource,
            params=body.params, claim=claim),
        overlap=True)
    d = result.decision
    approval = result.approval
    DECISIONS.labels(str(d.outcome)).inc()
    return ActionOut(
        decision=d.outcome, reason=d.explanation, rule_id=d.rule_id, decision_id=d.decision_id,
        policy_version=d.policy_version, params_hash=result.params_hash,
        short_code=result.short_code, resource=result.resource or None,
        approval_id=approval.id if approval else None,
        approval_url=f"/approve/{approval.id}" if approval else None,
        expires_at=approval.expires_at if approval else None,
        grant=result.grant, grant_expires_at=result.grant_expires_at,
    )
