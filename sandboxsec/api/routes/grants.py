"""Routes: ``POST /v1/grants/verify``, the downstream's single-use check of a grant."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec import jose
from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.policy.views import GrantVerdict
from sandboxsec.principal import Principal

__all__ = ["GrantJwks", "GrantKeys", "GrantVerifyIn", "GrantVerifyOut", "router"]

router = APIRouter(tags=["grants"])


class GrantVerifyIn(BaseModel):
    """The grant and exactly what the downstream is about to execute."""

    model_config = ConfigDict(extra="forbid")

    grant: str = Field(min_length=1, max_length=4096)
    action: str = Field(min_length=1, max_length=64)
    params: dict[str, Any]
    resource: str | None = Field(default=None, max_length=512,
                                 description="Checked against the grant when given.")


class GrantVerifyOut(GrantVerdict):
    """A valid grant, now used: a second verification is refused."""

    valid: Literal[True] = True


class GrantKeys(BaseModel):
    """Grant signing public keys (raw Ed25519, base64) by key id, for offline pre-checks."""

    keys: dict[str, str]


class GrantJwks(BaseModel):
    """Grant signing public keys as an RFC 7517 JWK Set (OKP Ed25519, ``kid`` = key id)."""

    keys: list[dict[str, str]]


@router.post("/grants/verify", response_model=GrantVerifyOut)
def verify_grant(body: GrantVerifyIn, services: ServicesDep,
                 who: Annotated[Principal, Depends(require("grant:verify"))]) -> GrantVerifyOut:
    """Valid once: a used, expired, or differently-parametrised grant is refused with its reason."""
    v = services.grants.verify_grant(who, token=body.grant, action=body.action,
                                     params=body.params, resource=body.resource)
    return GrantVerifyOut.model_validate(v, from_attributes=True)


@router.get("/grants/keys", response_model=GrantKeys)
def grant_keys(services: ServicesDep) -> GrantKeys:
    """The public keys grants are signed with (public: no key needed)."""
    return GrantKeys(keys={k: base64.b64encode(v).decode("ascii")
                           for k, v in services.grants.public_keys().items()})


@router.get("/grants/jwks", response_model=GrantJwks)
def grant_jwks(services: ServicesDep) -> GrantJwks:
    """The grant keys as a JWK Set, so any JOSE library checks a grant offline (public)."""
    return GrantJwks(keys=[
        jose.okp_jwk(Ed25519PublicKey.from_public_bytes(raw), kid)
        for kid, raw in sorted(services.grants.public_keys().items())
    ])
