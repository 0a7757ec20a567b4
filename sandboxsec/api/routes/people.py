"""Routes: people (admin), enrolment, passkey sign-in and the signed-in person's approvals.

Admin routes take an API key like every ``/v1`` route.  The enrolment routes are authorized by
the one-time link's token.  The ``/v1/me`` routes take the sign-in cookie set by
``/v1/signin`` (HttpOnly, SameSite=Strict) and, for every state change, an ``Origin`` header
equal to the configured public origin: a page of another site cannot act for the person.
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.api.gate import PERSON_COOKIE
from sandboxsec.api.routes.approvals import _PAGE_HEADERS, ApprovalOut, _out
from sandboxsec.people.decisions import PersonApproval
from sandboxsec.people.errors import OriginForbiddenError
from sandboxsec.people.service import CredentialView, PersonPrincipal, PersonView
from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.principal import Principal
from sandboxsec.services import Services

__all__ = ["page_router", "router"]

router = APIRouter(tags=["people"])
page_router = APIRouter(include_in_schema=False)

COOKIE = PERSON_COOKIE
Id = Annotated[str, Path(min_length=1, max_length=64)]
Token = Annotated[str, Path(min_length=1, max_length=100)]

_NO_STORE = {"Cache-Control": "no-store"}


# ---------------------------------------------------------------------- shapes

class PersonIn(BaseModel):
    """A person to enrol."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, examples=["Alice Example"])
    handle: str = Field(min_length=1, max_length=64, examples=["alice"])
    groups: list[str] = Field(default_factory=list, max_length=32, examples=[["treasury"]])


class CredentialOut(BaseModel):
    """A registered passkey (never its key material)."""

    id: str
    credential_id: str
    aaguid: str
    backup_eligible: bool
    sign_count: int
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class PersonOut(BaseModel):
    """A person and their passkeys."""

    person_id: str
    name: str
    handle: str
    groups: list[str]
    created_at: datetime
    disabled_at: datetime | None = None
    credentials: list[CredentialOut]


class EnrolmentOut(BaseModel):
    """A one-time enrolment link: give it to the person (shown once)."""

    person_id: str
    enrolment_path: str
    enrolment_url: str
    expires_at: datetime


class CreatedPersonOut(PersonOut):
    """A new person and their first enrolment link."""

    enrolment: EnrolmentOut


class OwnerIn(BaseModel):
    """The person a session acts for."""

    model_config = ConfigDict(extra="forbid")

    person_id: str = Field(min_length=1, max_length=40)


class OwnerOut(BaseModel):
    """A session and its owner."""

    session_id: str
    owner_id: str


class CredentialIn(BaseModel):
    """A WebAuthn result (``PublicKeyCredential.toJSON()``) and the challenge it answers."""

    model_config = ConfigDict(extra="forbid")

    challenge_id: str = Field(min_length=1, max_length=40)
    credential: dict[str, Any]


class DecisionIn(CredentialIn):
    """A passkey-signed decision: the params_hash shown, the challenge and the assertion."""

    params_hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class ChallengeIn(BaseModel):
    """Which decision the challenge is for."""

    model_config = ConfigDict(extra="forbid")

    decision: str = Field(pattern=r"^(approve|deny)$")


class MeOut(BaseModel):
    """The signed-in person."""

    person_id: str
    tenant_id: str
    name: str
    handle: str
    signin_expires_at: datetime


class PersonApprovalOut(ApprovalOut):
    """A request routed to the signed-in person, with its quorum and the votes so far."""

    quorum: int
    signer: str
    approvals: int
    my_vote: str | None = None


# ---------------------------------------------------------------------- helpers

def _cred(c: CredentialView) -> CredentialOut:
    return CredentialOut(id=c.id, credential_id=c.credential_id, aaguid=c.aaguid,
                         backup_eligible=c.backup_eligible, sign_count=c.sign_count,
                         created_at=c.created_at, last_used_at=c.last_used_at,
                         revoked_at=c.revoked_at)


def _person(p: PersonView) -> dict[str, Any]:
    return {"person_id": p.id, "name": p.name, "handle": p.handle, "groups": list(p.groups),
            "created_at": p.created_at, "disabled_at": p.disabled_at,
            "credentials": [_cred(c) for c in p.credentials]}


def _papproval(a: PersonApproval) -> PersonApprovalOut:
    base = _out(a.approval).model_dump()
    return PersonApprovalOut(**base, quorum=a.quorum, signer=a.signer, approvals=a.approvals,
                             my_vote=a.my_vote)


def _check_origin(request: Request, services: Services) -> None:
    origin = request.headers.get("origin")
    if origin is None or origin not in services.settings.webauthn_origins():
        raise OriginForbiddenError("this request must come from the approval page's origin")


def signed_in(request: Request, services: ServicesDep) -> PersonPrincipal:
    """The person signed in on this browser (``signin_required`` otherwise).

    State-changing methods also need the configured ``Origin``.
    """
    # The person gate (api/gate.py) signed this very cookie in before the body was read.
    admitted = request.scope.get("state", {}).get("person")
    person = (admitted if isinstance(admitted, PersonPrincipal)
              else services.people.authenticate(request.cookies.get(COOKIE)))
    if request.method not in ("GET", "HEAD"):
        _check_origin(request, services)
    return person


Person = Annotated[PersonPrincipal, Depends(signed_in)]


def same_origin(request: Request, services: ServicesDep) -> None:
    """Refuse (before the body is read) a call that does not come from the public origin."""
    _check_origin(request, services)


FromPage = Depends(same_origin)


# ---------------------------------------------------------------------- admin

@router.post("/people", response_model=CreatedPersonOut, status_code=201)
def create_person(body: PersonIn, services: ServicesDep,
                  who: Annotated[Principal, Depends(require("people:manage"))]) -> JSONResponse:
    """Enrol a person (name, handle, approver groups); returns a one-time enrolment link."""
    person, link = services.people.create_person(who, name=body.name, handle=body.handle,
                                                 groups=body.groups)
    out = CreatedPersonOut(**_person(person), enrolment=EnrolmentOut(
        person_id=link.person_id, enrolment_path=link.path,
        enrolment_url=services.settings.public_origin + link.path, expires_at=link.expires_at))
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers=_NO_STORE)


@router.get("/people", response_model=list[PersonOut])
def list_people(services: ServicesDep,
                who: Annotated[Principal, Depends(require("people:manage"))]) -> list[PersonOut]:
    """The tenant's people and their passkeys."""
    return [PersonOut(**_person(p)) for p in services.people.list_people(who)]


@router.get("/people/{person_id}", response_model=PersonOut)
def get_person(person_id: Id, services: ServicesDep,
               who: Annotated[Principal, Depends(require("people:manage"))]) -> PersonOut:
    """One person and their passkeys."""
    return PersonOut(**_person(services.people.get_person(who, person_id)))


@router.delete("/people/{person_id}", response_model=PersonOut)
def disable_person(person_id: Id, services: ServicesDep,
                   who: Annotated[Principal, Depends(require("people:manage"))]) -> PersonOut:
    """Disable a person: they can no longer sign in or decide; their sign-ins end."""
    return PersonOut(**_person(services.people.disable_person(who, person_id)))


@router.delete("/people/{person_id}/credentials/{credential_id}", response_model=PersonOut)
def revoke_credential(person_id: Id, credential_id: Id, services: ServicesDep,
                      who: Annotated[Principal, Depends(require("people:manage"))]
                      ) -> PersonOut:
    """Revoke one of a person's passkeys (``credential_id`` is the ``id`` listed with it): it
    signs nothing any more and its sign-ins end; the person's other passkeys keep working."""
    return PersonOut(**_person(services.people.revoke_credential(who, person_id,
                                                                 credential_id)))


@router.post("/people/{person_id}/enrolments", response_model=EnrolmentOut, status_code=201)
def new_enrolment(person_id: Id, services: ServicesDep,
                  who: Annotated[Principal, Depends(require("people:manage"))]) -> JSONResponse:
    """Another one-time enrolment link (to add a passkey)."""
    link = services.people.new_enrolment(who, person_id)
    out = EnrolmentOut(person_id=link.person_id, enrolment_path=link.path,
                       enrolment_url=services.settings.public_origin + link.path,
                       expires_at=link.expires_at)
    return JSONResponse(out.model_dump(mode="json"), status_code=201, headers=_NO_STORE)


@router.put("/sessions/{session_id}/owner", response_model=OwnerOut)
def assign_owner(session_id: Id, body: OwnerIn, services: ServicesDep,
                 who: Annotated[Principal, Depends(require("session:assign"))]) -> OwnerOut:
    """Name the person a session acts for: once, by an admin (never by the agent)."""
    owner = services.people.assign_owner(who, session_id, body.person_id)
    return OwnerOut(session_id=session_id, owner_id=owner)


# ---------------------------------------------------------------------- enrolment

@router.post("/enroll/{token}/options")
def enrolment_options(token: Token, services: ServicesDep) -> JSONResponse:
    """Registration options for the person holding the link (resident key, UV required)."""
    return JSONResponse(services.people.enrolment_options(token), headers=_NO_STORE)


@router.post("/enroll/{token}/register", response_model=CredentialOut, status_code=201)
def enrolment_register(token: Token, body: CredentialIn, services: ServicesDep
                       ) -> CredentialOut:
    """Store the passkey the person made; the link is then used up."""
    return _cred(services.people.register(token, body.challenge_id, body.credential))


# ---------------------------------------------------------------------- sign-in

@router.post("/signin/options", dependencies=[FromPage])
def signin_options(services: ServicesDep) -> JSONResponse:
    """Options for a passkey sign-in (any of the tenant's people)."""
    return JSONResponse(services.people.signin_options(), headers=_NO_STORE)


@router.post("/signin", response_model=MeOut, dependencies=[FromPage])
def signin(body: CredentialIn, services: ServicesDep) -> JSONResponse:
    """Verify a passkey sign-in and set the sign-in cookie."""
    result = services.people.signin(body.challenge_id, body.credential)
    p = result.person
    resp = JSONResponse(MeOut(person_id=p.person_id, tenant_id=p.tenant_id, name=p.name,
                              handle=p.handle, signin_expires_at=p.expires_at
                              ).model_dump(mode="json"), headers=_NO_STORE)
    resp.set_cookie(COOKIE, result.token, httponly=True, samesite="strict", path="/",
                    secure=services.settings.public_origin.startswith("https://"),
                    max_age=services.settings.person_session_ttl_seconds)
    return resp


@router.post("/signout", status_code=204, dependencies=[FromPage])
def signout(request: Request, services: ServicesDep) -> Response:
    """End the sign-in of this browser."""
    services.people.signout(request.cookies.get(COOKIE))
    resp = Response(status_code=204)
    resp.delete_cookie(COOKIE, path="/")
    return resp


@router.get("/me", response_model=MeOut)
def me(person: Person) -> MeOut:
    """Who is signed in."""
    return MeOut(person_id=person.person_id, tenant_id=person.tenant_id, name=person.name,
                 handle=person.handle, signin_expires_at=person.expires_at)


@router.get("/me/approvals", response_model=list[PersonApprovalOut],
            response_model_exclude_none=True)
def my_approvals(person: Person, services: ServicesDep,
                 state: Annotated[ApprovalState | None, Query()] = ApprovalState.PENDING,
                 limit: Annotated[int, Query(ge=1, le=200)] = 50) -> list[PersonApprovalOut]:
    """Requests routed to the signed-in person, newest first (pending by default)."""
    return [_papproval(a) for a in services.person_approvals.list_for(person, state=state,
                                                                limit=limit)]


@router.get("/me/approvals/{approval_id}", response_model=PersonApprovalOut,
            response_model_exclude_none=True)
def my_approval(approval_id: Id, person: Person, services: ServicesDep) -> PersonApprovalOut:
    """One request routed to the signed-in person (404 for any other)."""
    return _papproval(services.person_approvals.get_for(person, approval_id))


@router.post("/me/approvals/{approval_id}/challenge")
def my_challenge(approval_id: Id, body: ChallengeIn, person: Person,
                 services: ServicesDep) -> JSONResponse:
    """A single-use challenge committing to this request, its params and the decision."""
    out = services.person_approvals.challenge(person, approval_id, body.decision)
    out["expires_at"] = out["expires_at"].isoformat().replace("+00:00", "Z")
    return JSONResponse(out, headers=_NO_STORE)


@router.post("/me/approvals/{approval_id}/approve", response_model=PersonApprovalOut,
             response_model_exclude_none=True)
def my_approve(approval_id: Id, body: DecisionIn, person: Person,
               services: ServicesDep) -> PersonApprovalOut:
    """Approve with a passkey assertion over the approve challenge."""
    return _papproval(services.person_approvals.decide(
        person, approval_id, "approve", params_hash=body.params_hash,
        challenge_id=body.challenge_id, credential=body.credential))


@router.post("/me/approvals/{approval_id}/deny", response_model=PersonApprovalOut,
             response_model_exclude_none=True)
def my_deny(approval_id: Id, body: DecisionIn, person: Person,
            services: ServicesDep) -> PersonApprovalOut:
    """Deny with a passkey assertion over the deny challenge."""
    return _papproval(services.person_approvals.decide(
        person, approval_id, "deny", params_hash=body.params_hash,
        challenge_id=body.challenge_id, credential=body.credential))


# ---------------------------------------------------------------------- pages

def _static(name: str) -> bytes:
    return resources.files("sandboxsec.api").joinpath(f"static/{name}").read_bytes()


@page_router.get("/enroll/{token}", response_class=HTMLResponse)
def enrol_page(token: Token) -> HTMLResponse:
    """The enrolment page: the person registers a passkey (the script reads the token)."""
    del token
    return HTMLResponse(_static("enroll.html"), headers=_PAGE_HEADERS)


@page_router.get("/approve", response_class=HTMLResponse)
def approve_list_page() -> HTMLResponse:
    """The signed-in person's pending requests, newest first."""
    return HTMLResponse(_static("approvals.html"), headers=_PAGE_HEADERS)

