"""Routes: the tenant admin reads and replaces the tenant's action policy."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.policy.engine import MAX_POLICY_BYTES
from sandboxsec.policy.views import PolicyView
from sandboxsec.principal import Principal

__all__ = ["PolicyIn", "PolicyOut", "router"]

router = APIRouter(tags=["policy"])


class PolicyIn(BaseModel):
    """A complete policy text (docs/policy.md), replacing the one in force."""

    model_config = ConfigDict(extra="forbid")

    # No max_length here: a model limit would answer 400; the engine refuses an oversized
    # policy with 413 policy_too_large, as documented (the body limit bounds memory).
    text: str = Field(description=f"At most {MAX_POLICY_BYTES} bytes (UTF-8) and 1,000 rules; "
                      "larger is refused with 413 policy_too_large.")
    base_version: int | None = Field(
        default=None, ge=0,
        description="The version this change is based on; refused if another landed since.",
    )


class PolicyOut(BaseModel):
    version: int
    sha256: str
    rule_count: int
    is_default: bool
    updated_at: datetime | None
    updated_by: str | None
    text: str


class PolicyCheck(BaseModel):
    valid: bool
    sha256: str
    rule_count: int


def _out(view: PolicyView) -> PolicyOut:
    return PolicyOut(version=view.version, sha256=view.sha256, rule_count=view.rule_count,
                     is_default=view.is_default, updated_at=view.updated_at,
                     updated_by=view.updated_by, text=view.text)


@router.get("/policy", response_model=PolicyOut)
def get_policy(services: ServicesDep,
               who: Annotated[Principal, Depends(require("policy:read"))]) -> PolicyOut:
    """The tenant's policy in force; version 0 is the shipped default."""
    return _out(services.policy_admin.get_policy(who))


@router.put("/policy", response_model=PolicyOut)
def replace_policy(body: PolicyIn, services: ServicesDep,
                   who: Annotated[Principal, Depends(require("policy:write"))]) -> PolicyOut:
    """Validate and install a new policy.  A bad one is refused (``policy_invalid`` naming the
    line) and the old one stays in force."""
    return _out(services.policy_admin.replace_policy(who, body.text,
                                                     base_version=body.base_version))


@router.post("/policy/validate", response_model=PolicyCheck)
def validate_policy(body: PolicyIn, services: ServicesDep,
                    _who: Annotated[Principal, Depends(require("policy:read"))]) -> PolicyCheck:
    """Check a policy text without installing it."""
    compiled = services.policy_admin.validate_policy(body.text)
    return PolicyCheck(valid=True, sha256=compiled.sha256, rule_count=len(compiled.rules))
