"""Routes: approval requests (read, wait, approve, deny) and the approver's page."""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.api.session_proof import ProofDep
from sandboxsec.errors import NotFoundError
from sandboxsec.metrics import APPROVAL_SECONDS
from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState
from sandboxsec.policy.views import ApprovalView
from sandboxsec.principal import Principal, Role
from sandboxsec.sessions.errors import DpopSessionMismatchError

__all__ = ["ApprovalOut", "DecideIn", "page_router", "router"]

router = APIRouter(tags=["approvals"])
page_router = APIRouter(include_in_schema=False)

ApprovalId = Annotated[str, Path(min_length=1, max_length=64)]

# The page runs only our own script and style, cannot be framed (clickjacking an approve
# button is the classic attack on approval pages) and sends no referrer.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_ASSETS = {"approve.js": "text/javascript", "approve.css": "text/css",
           "passkey.js": "text/javascript", "approvals.js": "text/javascript",
           "enroll.js": "text/javascript"}


class ApprovalOut(ApprovalView):
    """An approval request: the exact action and params, their hash, and the state."""

    grant: str | None = Field(default=None,
                              description="Single-use grant: agent keys only, once approved.")


class DecideIn(BaseModel):
    """The params_hash the approver was shown; a mismatch is refused."""

    model_config = ConfigDict(extra="forbid")

    params_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


def _out(v: ApprovalView) -> ApprovalOut:
    return ApprovalOut.model_validate(v, from_attributes=True)


def _decided(v: ApprovalView) -> ApprovalOut:
    # How long the human took: creation to decision, by outcome.
    if v.decided_at is not None:
        APPROVAL_SECONDS.labels(str(v.state)).observe(
            max(0.0, (v.decided_at - v.created_at).total_seconds()))
    return _out(v)


@router.get("/approvals", response_model=list[ApprovalOut], response_model_exclude_none=True)
def list_approvals(
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("approval:read"))],
    proof: ProofDep,
    state: Annotated[ApprovalState | None, Query(description="Only requests in this state.")]
    = None,
    session_id: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[ApprovalOut]:
    """The tenant's approval requests, newest first: what an approver has to look at.

    An agent lists only the requests of a session it holds: ``session_id`` and a ``DPoP``
    proof for it are required."""
    if who.role is Role.AGENT:
        if session_id is None:
            raise DpopSessionMismatchError("an agent lists the approvals of its own session: "
                                           "pass session_id with a proof for it")
        services.session_binding.require(who, proof, session_id)
    return [_out(v) for v in services.approvals.list_approvals(who, state=state,
                                                            session_id=session_id, limit=limit)]


@router.get("/approvals/{approval_id}", response_model=ApprovalOut,
            response_model_exclude_none=True)
def get_approval(approval_id: ApprovalId, services: ServicesDep,
                 who: Annotated[Principal, Depends(require("approval:read"))],
                 proof: ProofDep) -> ApprovalOut:
    """The request, its exact params and its state (the agent also sees its grant, and only
    for a session it proves it holds)."""
    view = services.approvals.get_approval(who, approval_id)
    if who.role is Role.AGENT:
        services.session_binding.require(who, proof, view.session_id)
    return _out(view)


@router.get("/approvals/{approval_id}/wait", response_model=ApprovalOut,
            response_model_exclude_none=True)
async def wait_approval(
    approval_id: ApprovalId,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("approval:wait"))],
    proof: ProofDep,
    timeout: Annotated[float, Query(ge=0, le=600, description="Seconds; capped by the "
                                    "service (approval_wait_max_seconds).")] = 30.0,
) -> ApprovalOut:
    """Returns as soon as the request leaves ``pending``, or at the timeout (still pending).

    The request carries a ``DPoP`` proof for the approval's session, checked first."""
    view = await run_in_threadpool(services.approvals.get_approval, who, approval_id)
    await run_in_threadpool(services.session_binding.require, who, proof, view.session_id)
    return _out(await services.approvals.wait(who, approval_id, timeout))


@router.post("/approvals/{approval_id}/approve", response_model=ApprovalOut,
             response_model_exclude_none=True)
def approve(approval_id: ApprovalId, body: DecideIn, services: ServicesDep,
            who: Annotated[Principal, Depends(require("approval:decide"))]) -> ApprovalOut:
    """Approve exactly what was shown; the agent then gets a single-use grant."""
    return _decided(services.approvals.decide(who, approval_id, ApprovalEvent.APPROVE,
                                          body.params_hash))


@router.post("/approvals/{approval_id}/deny", response_model=ApprovalOut,
             response_model_exclude_none=True)
def deny(approval_id: ApprovalId, body: DecideIn, services: ServicesDep,
         who: Annotated[Principal, Depends(require("approval:decide"))]) -> ApprovalOut:
    """Deny the request."""
    return _decided(services.approvals.decide(who, approval_id, ApprovalEvent.DENY,
                                              body.params_hash))


def _static(name: str) -> bytes:
    return resources.files("sandboxsec.api").joinpath(f"static/{name}").read_bytes()


@page_router.get("/approve/assets/{name}")
def approve_asset(name: str) -> Response:
    """The page's script and style (a fixed list: nothing else is served from here)."""
    if name not in _ASSETS:
        raise NotFoundError("no such asset")
    return Response(_static(name), media_type=_ASSETS[name], headers=_PAGE_HEADERS)


@page_router.get("/approve/{approval_id}", response_class=HTMLResponse)
def approve_page(approval_id: ApprovalId) -> HTMLResponse:
    """The approver's page: shows exactly what is approved; calls the API with their key."""
    del approval_id  # the page reads it from its own URL
    return HTMLResponse(_static("approve.html"), headers=_PAGE_HEADERS)
