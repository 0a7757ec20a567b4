"""Routes: who am I, and the tenant admin's API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.principal import Principal, Role
from sandboxsec.tenants.errors import TenantConfirmationError

router = APIRouter(tags=["tenants"])


class WhoAmI(BaseModel):
    tenant_id: str
    tenant_name: str
    key_id: str
    role: Role


class KeyCreate(BaseModel):
    role: Role
    label: str = Field(default="", max_length=200)


class KeyCreated(BaseModel):
    key_id: str
    role: Role
    key: str = Field(description="The API key; shown once, never stored in clear.")


class KeyInfo(BaseModel):
    key_id: str
    role: Role
    label: str
    created_at: datetime
    revoked_at: datetime | None


@router.get("/tenant", response_model=WhoAmI)
def whoami(services: ServicesDep,
           who: Annotated[Principal, Depends(require("tenant:read"))]) -> WhoAmI:
    """The caller's tenant, key id and role."""
    tenant = services.tenants.get(who.tenant_id)
    return WhoAmI(tenant_id=tenant.id, tenant_name=tenant.name, key_id=who.key_id, role=who.role)


class TenantDelete(BaseModel):
    confirm_name: str = Field(max_length=200, description="The tenant's name, to confirm.")


class TenantDeleted(BaseModel):
    tenant_id: str
    deleted_at: datetime
    keys_revoked: int
    keks_destroyed: int
    deks_destroyed: int
    #: The tenant's own key in the key provider was destroyed by this deletion.
    tenant_key_destroyed: bool = False


@router.delete("/tenant", response_model=TenantDeleted)
def delete_tenant(body: TenantDelete, services: ServicesDep,
                  who: Annotated[Principal, Depends(require("tenant:delete"))]) -> TenantDeleted:
    """Delete this tenant: its keys are crypto-shredded (data unreadable) and its API keys
    revoked.  Irreversible; the body must name the tenant."""
    tenant = services.tenants.get(who.tenant_id)
    if body.confirm_name != tenant.name:
        raise TenantConfirmationError("confirm_name does not match this tenant's name")
    d = services.tenants.delete(who.tenant_id, actor=who)
    return TenantDeleted(tenant_id=d.tenant_id, deleted_at=d.deleted_at,
                         keys_revoked=d.keys_revoked, keks_destroyed=d.keks_destroyed,
                         deks_destroyed=d.deks_destroyed,
                         tenant_key_destroyed=d.tenant_key_destroyed)


@router.post("/api-keys", response_model=KeyCreated, status_code=201)
def create_key(body: KeyCreate, services: ServicesDep,
               who: Annotated[Principal, Depends(require("apikey:manage"))]) -> KeyCreated:
    """Issue another API key for this tenant."""
    issued = services.tenants.create_key(who.tenant_id, body.role, actor=who, label=body.label)
    return KeyCreated(key_id=issued.key_id, role=issued.role, key=issued.key)


@router.get("/api-keys", response_model=list[KeyInfo])
def list_keys(services: ServicesDep,
              who: Annotated[Principal, Depends(require("apikey:manage"))]) -> list[KeyInfo]:
    """This tenant's keys (ids, roles, labels; never the keys)."""
    return [KeyInfo(key_id=k.id, role=Role(k.role), label=k.label, created_at=k.created_at,
                    revoked_at=k.revoked_at) for k in services.tenants.list_keys(who.tenant_id)]


@router.delete("/api-keys/{key_id}", status_code=204)
def revoke_key(key_id: str, services: ServicesDep,
               who: Annotated[Principal, Depends(require("apikey:manage"))]) -> None:
    """Revoke one of this tenant's keys; it stops working at once."""
    services.tenants.revoke_key(who.tenant_id, key_id, actor=who)
