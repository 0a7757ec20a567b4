"""Routes: agent sessions, started from an affirming attestation token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.api.session_proof import ProofDep
from sandboxsec.principal import Principal, Role
from sandboxsec.sessions.views import SessionView

router = APIRouter(tags=["sessions"])


class SessionCreate(BaseModel):
    attestation_token: str = Field(max_length=16384)


class SessionOut(BaseModel):
    session_id: str
    expires_at: datetime
    created_at: datetime
    image_name: str
    image_digest: str
    ak_name: str
    attested: bool
    attestation_id: str | None
    key_thumbprint: str | None = Field(
        default=None, description="RFC 7638 thumbprint of the TPM-held session key")
    ended_at: datetime | None = None


class SessionEnded(BaseModel):
    session_id: str
    ended_at: datetime


def _out(row: SessionView) -> SessionOut:
    return SessionOut(
        session_id=row.id,
        expires_at=row.expires_at,
        created_at=row.created_at,
        image_name=row.image_name,
        image_digest=row.image_digest,
        ak_name=row.ak_name,
        attested=row.attested,
        attestation_id=row.attestation_id,
        key_thumbprint=row.key_thumbprint,
        ended_at=row.ended_at,
    )


@router.post("/sessions", response_model=SessionOut, status_code=201)
def start_session(
    body: SessionCreate,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("session:create"))],
    proof: ProofDep,
) -> SessionOut:
    """Start a session; refused without an affirming, unexpired, unused token of this tenant
    naming a certified session key, and a ``DPoP`` proof by that key (``sid``: the token's
    attestation id)."""
    return _out(services.sessions.start(who, body.attestation_token, proof))


@router.get("/sessions/{session_id}", response_model=SessionOut)
def get_session(
    session_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("session:read"))],
    proof: ProofDep,
) -> SessionOut:
    """One session of this tenant (404 for unknown ids and other tenants' sessions); an agent
    reads only a session it proves it holds."""
    if who.role is Role.AGENT:
        services.session_binding.require(who, proof, session_id)
    return _out(services.sessions.get(who, session_id))


@router.post("/sessions/{session_id}/end", response_model=SessionEnded)
def end_session(
    session_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("session:end"))],
    proof: ProofDep,
) -> SessionEnded:
    """End a session now (an admin; or the session itself, with a proof).  Every later
    action, wait and write in it is refused, and so are its outstanding grants."""
    ended = services.session_binding.end(
        who, session_id, proof if who.role is Role.AGENT else None)
    return SessionEnded(session_id=session_id, ended_at=ended)
