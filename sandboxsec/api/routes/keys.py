"""Routes: the tenant admin's encryption keys (status, rotate, rewrap, retire)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.crypto.admin import KeyStatus
from sandboxsec.principal import Principal

__all__ = ["router"]

router = APIRouter(tags=["keys"])


class KeyVersionOut(BaseModel):
    version: int
    created_at: datetime
    provider: str = Field(description="Which root key wraps this version.")
    data_keys: int = Field(description="Data keys currently wrapped by this version.")


class KeyStatusOut(BaseModel):
    """The tenant's key-encryption keys; version 0 means none made yet."""

    tenant_id: str
    current_version: int
    min_decryption_version: int
    shredded_at: datetime | None
    versions: list[KeyVersionOut]


class RotateIn(BaseModel):
    rewrap: bool = Field(default=False, description="Also re-wrap old data keys at once.")


class RewrapOut(BaseModel):
    version: int
    rewrapped: int
    skipped_retired: int = Field(description="Data keys below the minimum decryption version.")


class RetireIn(BaseModel):
    min_decryption_version: int = Field(ge=1)


def _out(status: KeyStatus) -> KeyStatusOut:
    return KeyStatusOut(
        tenant_id=status.tenant_id, current_version=status.current_version,
        min_decryption_version=status.min_decryption_version, shredded_at=status.shredded_at,
        versions=[
            KeyVersionOut(version=v.version, created_at=v.created_at, provider=v.provider_id,
                          data_keys=v.data_keys)
            for v in status.versions
        ],
    )


@router.get("/keys", response_model=KeyStatusOut)
def key_status(services: ServicesDep,
               who: Annotated[Principal, Depends(require("keys:read"))]) -> KeyStatusOut:
    """The tenant's key versions and minimum decryption version."""
    return _out(services.key_admin.status(who.tenant_id))


@router.post("/keys/rotate", response_model=KeyStatusOut)
def rotate(body: RotateIn, services: ServicesDep,
           who: Annotated[Principal, Depends(require("keys:manage"))]) -> KeyStatusOut:
    """Make a new key version for new data; old data stays readable."""
    return _out(services.key_admin.rotate(who.tenant_id, who, rewrap=body.rewrap))


@router.post("/keys/rewrap", response_model=RewrapOut)
def rewrap(services: ServicesDep,
           who: Annotated[Principal, Depends(require("keys:manage"))]) -> RewrapOut:
    """Re-wrap the data keys of older versions under the current one (no data re-encrypted)."""
    result = services.key_admin.rewrap(who.tenant_id, who)
    return RewrapOut(version=result.version, rewrapped=result.rewrapped,
                     skipped_retired=result.skipped_retired)


@router.post("/keys/retire", response_model=KeyStatusOut)
def retire(body: RetireIn, services: ServicesDep,
           who: Annotated[Principal, Depends(require("keys:manage"))]) -> KeyStatusOut:
    """Set the minimum decryption version: data under older versions stops opening."""
    return _out(services.key_admin.retire(who.tenant_id, who, body.min_decryption_version))
