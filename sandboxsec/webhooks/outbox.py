"""The webhook outbox (storage adapter): enqueue in the caller's transaction; claim and settle.

A message is written in the same transaction as the change it announces (an approval request,
a decision), one row per enabled webhook of the tenant, so it is never lost nor sent for a
change that rolled back.  Any worker may claim a due row with a conditional update (a lease),
so a restarted or crashed worker's rows are picked up again when the lease ends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, or_, update
from sqlmodel import Session, col, select

from sandboxsec.ids import new_id
from sandboxsec.webhooks.models import Webhook, WebhookDelivery

__all__ = ["SqlOutbox", "backoff", "claim", "due", "enqueue"]


def enqueue(s: Session, tenant_id: str, event_type: str, data: Mapping[str, Any],
            now: datetime) -> int:
    """Queue ``event_type`` for every enabled webhook of the tenant, in ``s``."""
    hooks = s.exec(select(Webhook.id).where(Webhook.tenant_id == tenant_id,
                                            col(Webhook.disabled_at).is_(None))).all()
    for hook_id in hooks:
        delivery_id = new_id("msg")
        payload = json.dumps({"type": event_type, "timestamp": now.isoformat(),
                              "data": {"tenant_id": tenant_id, **data}},
                             sort_keys=True, separators=(",", ":"))
        s.add(WebhookDelivery(id=delivery_id, tenant_id=tenant_id, webhook_id=hook_id,
                              event_type=event_type, payload=payload, state="pending",
                              attempts=0, next_attempt_at=now, created_at=now))
    return len(hooks)


def due(s: Session, now: datetime, limit: int) -> list[str]:
    """Ids of pending deliveries whose next attempt is due and that nobody holds."""
    rows = s.exec(select(WebhookDelivery.id).where(
        WebhookDelivery.state == "pending",
        col(WebhookDelivery.next_attempt_at) <= now,
        or_(col(WebhookDelivery.locked_until).is_(None),
            col(WebhookDelivery.locked_until) < now),
    ).order_by(col(WebhookDelivery.next_attempt_at)).limit(limit)).all()
    return list(rows)


def claim(s: Session, delivery_id: str, now: datetime, lease: timedelta) -> bool:
    """Take the lease of one due delivery; of two workers exactly one wins."""
    result = s.execute(
        update(WebhookDelivery)
        .where(col(WebhookDelivery.id) == delivery_id,
               col(WebhookDelivery.state) == "pending",
               or_(col(WebhookDelivery.locked_until).is_(None),
                   col(WebhookDelivery.locked_until) < now))
        .values(locked_until=now + lease))
    return int(cast(CursorResult[Any], result).rowcount) == 1


def backoff(attempts: int, base: float, cap: float) -> timedelta:
    """Delay after ``attempts`` failed attempts: ``base * 2^(attempts-1)``, at most ``cap``."""
    return timedelta(seconds=min(cap, base * (2 ** max(0, attempts - 1))))


class SqlOutbox:
    """The webhooks domain's answer to the policy services' ``Outbox``."""

    def enqueue(self, tx: Any, tenant_id: str, event_type: str, data: Mapping[str, Any],
                now: datetime) -> int:
        """See :func:`enqueue`."""
        return enqueue(tx, tenant_id, event_type, data, now)
