"""Routes: a tenant's webhooks and their deliveries (admin)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sandboxsec.api.deps import ServicesDep, require
from sandboxsec.principal import Principal
from sandboxsec.webhooks.service import DeliveryView, WebhookView

__all__ = ["router"]

router = APIRouter(tags=["webhooks"])
Id = Annotated[str, Path(min_length=1, max_length=64)]


class WebhookIn(BaseModel):
    """Where to send the tenant's notifications."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, examples=["https://hooks.example/approvals"])


class WebhookOut(BaseModel):
    """A webhook; ``secret`` (``whsec_…``) is shown once, when it is created."""

    webhook_id: str
    url: str
    created_at: datetime
    disabled_at: datetime | None = None
    secret: str | None = None


class DeliveryOut(BaseModel):
    """One message to a webhook: ``pending`` (retrying with backoff), ``delivered``, ``failed``."""

    delivery_id: str
    webhook_id: str
    event_type: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None


def _hook(v: WebhookView) -> WebhookOut:
    return WebhookOut(webhook_id=v.id, url=v.url, created_at=v.created_at,
                      disabled_at=v.disabled_at, secret=v.secret)


def _delivery(d: DeliveryView) -> DeliveryOut:
    return DeliveryOut(delivery_id=d.id, webhook_id=d.webhook_id, event_type=d.event_type,
                       state=d.state, attempts=d.attempts, next_attempt_at=d.next_attempt_at,
                       last_status=d.last_status, last_error=d.last_error,
                       created_at=d.created_at, delivered_at=d.delivered_at)


@router.post("/webhooks", response_model=WebhookOut, status_code=201)
def create_webhook(body: WebhookIn, services: ServicesDep,
                   who: Annotated[Principal, Depends(require("webhook:manage"))]
                   ) -> JSONResponse:
    """Register a webhook (Standard Webhooks signatures); the secret is shown once."""
    out = _hook(services.webhooks.create(who, body.url))
    return JSONResponse(out.model_dump(mode="json"), status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.get("/webhooks", response_model=list[WebhookOut], response_model_exclude_none=True)
def list_webhooks(services: ServicesDep,
                  who: Annotated[Principal, Depends(require("webhook:manage"))]
                  ) -> list[WebhookOut]:
    """The tenant's webhooks."""
    return [_hook(v) for v in services.webhooks.list_webhooks(who)]


@router.delete("/webhooks/{webhook_id}", response_model=WebhookOut,
               response_model_exclude_none=True)
def disable_webhook(webhook_id: Id, services: ServicesDep,
                    who: Annotated[Principal, Depends(require("webhook:manage"))]
                    ) -> WebhookOut:
    """Stop sending to a webhook."""
    return _hook(services.webhooks.disable(who, webhook_id))


@router.get("/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut],
            response_model_exclude_none=True)
def list_deliveries(
    webhook_id: Id, services: ServicesDep,
    who: Annotated[Principal, Depends(require("webhook:manage"))],
    state: Annotated[str | None, Query(pattern=r"^(pending|delivered|failed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[DeliveryOut]:
    """A webhook's deliveries, newest first, with attempts, last status and last error."""
    return [_delivery(d) for d in services.webhooks.deliveries(who, webhook_id, state=state,
                                                               limit=limit)]
