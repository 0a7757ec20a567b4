"""Routes: agent sessions, started from an affirming attestation token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.principal import Principal
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
    )


@router.post("/sessions", response_model=SessionOut, status_code=201)
def start_session(
    body: SessionCreate,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("session:create"))],
) -> SessionOut:
    """Start a session; refused without an affirming, unexpired, unused token of this tenant."""
    return _out(services.sessions.start(who, body.attestation_token))


@router.get("/sessions/{session_id}", response_model=SessionOut)
def get_session(
    session_id: str,
    services: ServicesDep,
    who: Annotated[Principal, Depends(require("session:read"))],
) -> SessionOut:
    """One session of this tenant (404 for unknown ids and other tenants' sessions)."""
    return _out(services.sessions.get(who, session_id))
