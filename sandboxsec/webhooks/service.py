"""Per-tenant webhooks: registration, the delivery worker, and what was delivered or failed.

Deliveries come from the persistent outbox (:mod:`.outbox`): a service restart loses nothing,
and the next worker to start retries what is due.  Every delivery and every failed attempt is
audited in the tenant's log.  Targets must be https on public addresses (checked again at
each delivery, after DNS resolution) unless ``webhook_allow_insecure`` is set for development.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import structlog
from sqlmodel import col

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord, AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped, select_scoped
from sandboxsec.webhooks.errors import (
    WebhookKeyUnavailableError,
    WebhookUrlInvalidError,
)
from sandboxsec.webhooks.models import Webhook, WebhookDelivery
from sandboxsec.webhooks.outbox import backoff, claim, due
from sandboxsec.webhooks.signing import new_secret, signed_headers

__all__ = ["DeliveryView", "WebhookService", "WebhookView"]

log = structlog.get_logger("sandboxsec.webhooks")
_BATCH = 20
#: How long stopping waits for the delivery thread (it is a daemon thread).
_JOIN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class WebhookView:
    """A tenant's webhook (the secret is shown only when it is created)."""

    id: str
    url: str
    created_at: datetime
    disabled_at: datetime | None
    secret: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """One message to one webhook and how its delivery went."""

    id: str
    webhook_id: str
    event_type: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class SecretWrapper(Protocol):
    """Wraps webhook secrets at rest (the root key provider)."""

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        """Encrypt ``secret`` bound to ``aad``."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt what :meth:`wrap` made with the same ``aad``."""
        ...


def _aad(webhook_id: str) -> bytes:
    return b"sandboxsec/v1/webhook-secret\x00" + webhook_id.encode("ascii")


class WebhookService:
    """Registers tenants' webhooks and delivers their outbox in a background thread."""

    def __init__(self, *, db: Database, clock: Clock, settings: Settings, audit: AuditSink,
                 keys: Callable[[], SecretWrapper]) -> None:
        # The key provider is built on first use: starting the worker opens no key store.
        self._db = db
        self._clock = clock
        self._settings = settings
        self._audit = audit
        self._keys = keys
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ admin

    def _check_url(self, url: Any) -> str:
        if not isinstance(url, str) or len(url) > 2048 or not url.isprintable():
            raise WebhookUrlInvalidError("url must be a URL of at most 2048 characters")
        parts = urlsplit(url)
        insecure = self._settings.webhook_allow_insecure
        if parts.scheme != "https" and not (insecure and parts.scheme == "http"):
            raise WebhookUrlInvalidError("webhook URLs must be https://")
        if not parts.hostname or parts.username or parts.password or parts.fragment:
            raise WebhookUrlInvalidError("webhook URLs need a host and no credentials or "
                                         "fragment")
        return url

    def create(self, who: Principal, url: Any) -> WebhookView:
        """Register a webhook; its signing secret is returned once."""
        url = self._check_url(url)
        secret = new_secret()
        hook_id = new_id("wh")
        try:
            wrapped = self._keys().wrap(secret.encode("ascii"), _aad(hook_id))
        except SandboxSecError as exc:
            raise WebhookKeyUnavailableError("the root key cannot wrap the secret") from exc
        now = self._clock.now()
        row = Webhook(id=hook_id, tenant_id=who.tenant_id, url=url, secret_wrapped=wrapped,
                      created_at=now, created_by=who.key_id)
        with self._db.session() as s:
            s.add(row)
            self._audit.append(AuditRecord.by(who, AuditEvent.WEBHOOK_CREATE, "success",
                                              object_ids={"webhook_id": hook_id},
                                              sensitive={"url": url}), session=s)
        return WebhookView(row.id, row.url, row.created_at, None, secret)

    def list_webhooks(self, who: Principal) -> list[WebhookView]:
        """The tenant's webhooks."""
        with self._db.session() as s:
            rows = s.exec(select_scoped(Webhook, who.tenant_id)
                          .order_by(col(Webhook.created_at))).all()
        return [WebhookView(r.id, r.url, r.created_at, r.disabled_at) for r in rows]

    def disable(self, who: Principal, webhook_id: str) -> WebhookView:
        """Stop sending to a webhook (queued messages to it are marked failed)."""
        now = self._clock.now()
        with self._db.session() as s:
            row = self._hook(s, who.tenant_id, webhook_id)
            if row.disabled_at is None:
                row.disabled_at = now
                s.add(row)
                self._audit.append(AuditRecord.by(who, AuditEvent.WEBHOOK_DISABLE, "success",
                                                  object_ids={"webhook_id": row.id}),
                                   session=s)
        return WebhookView(row.id, row.url, row.created_at, row.disabled_at)

    def deliveries(self, who: Principal, webhook_id: str, *, state: str | None = None,
                   limit: int = 50) -> list[DeliveryView]:
        """A webhook's messages, newest first: what was delivered, what is retried, failures."""
        with self._db.session() as s:
            self._hook(s, who.tenant_id, webhook_id)
            query = select_scoped(WebhookDelivery, who.tenant_id).where(
                WebhookDelivery.webhook_id == webhook_id)
            if state is not None:
                query = query.where(WebhookDelivery.state == state)
            rows = s.exec(query.order_by(col(WebhookDelivery.created_at).desc(),
                                         col(WebhookDelivery.id))
                          .limit(max(1, min(limit, 200)))).all()
        return [DeliveryView(r.id, r.webhook_id, r.event_type, r.state, r.attempts,
                             r.next_attempt_at, r.last_status, r.last_error, r.created_at,
                             r.delivered_at) for r in rows]

    @staticmethod
    def _hook(s: Any, tenant_id: str, webhook_id: str) -> Webhook:
        # Another tenant's webhook is indistinguishable from none (not_found).
        return get_scoped(s, Webhook, tenant_id, webhook_id, what="webhook")

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        """Start the delivery thread of this process (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="sandboxsec-webhooks",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the delivery thread; undelivered messages stay in the outbox."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            # Briefly: a serving process must stop within its supervisor's grace period (a
            # worker that overstays is killed, and a killed supervisor leaves it orphaned).
            # A delivery cut short is not lost: its lease expires and another process sends
            # it again with the same webhook-id (receivers drop duplicates).
            thread.join(timeout=_JOIN_SECONDS)

    def _run(self) -> None:
        with httpx.Client(timeout=self._settings.webhook_timeout_seconds,
                          follow_redirects=False) as client:
            while not self._stop.is_set():
                try:
                    self.run_once(client, stop=self._stop)
                except Exception:  # the worker must outlive a failing database or target
                    log.warning("webhook_worker_error", exc_info=False)
                self._stop.wait(self._settings.webhook_poll_seconds)

    def run_once(self, client: httpx.Client, *, stop: threading.Event | None = None) -> int:
        """Attempt every due delivery once (until ``stop`` is set); returns how many."""
        now = self._clock.now()
        lease = timedelta(seconds=self._settings.webhook_timeout_seconds * 2 + 5)
        with self._db.session() as s:
            ids = due(s, now, _BATCH)
        done = 0
        for delivery_id in ids:
            if stop is not None and stop.is_set():
                break
            with self._db.session() as s:
                if not claim(s, delivery_id, now, lease):
                    continue
            self._attempt(client, delivery_id)
            done += 1
        return done

    def _attempt(self, client: httpx.Client, delivery_id: str) -> None:
        with self._db.session() as s:
            d = s.get(WebhookDelivery, delivery_id)
            hook = s.get(Webhook, d.webhook_id) if d is not None else None
        if d is None or hook is None:
            return
        status: int | None = None
        error: str | None = None
        if hook.disabled_at is not None:
            error = "the webhook was disabled"
        else:
            try:
                secret = self._keys().unwrap(hook.secret_wrapped, _aad(hook.id)).decode("ascii")
                self._check_target(hook.url)
                headers = signed_headers(secret, d.id, self._clock.now(), d.payload)
                resp = client.post(hook.url, content=d.payload.encode("utf-8"),
                                   headers=headers)
                status = resp.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except SandboxSecError as exc:
                error = exc.message[:300]
            except (httpx.HTTPError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}"[:300]
        self._settle(d, status, error, final=hook.disabled_at is not None)

    def _settle(self, d: WebhookDelivery, status: int | None, error: str | None, *,
                final: bool) -> None:
        now = self._clock.now()
        attempts = d.attempts + 1
        ids = {"webhook_id": d.webhook_id, "delivery_id": d.id}
        body: dict[str, Any] = {"event_type": d.event_type, "attempts": attempts}
        if status is not None:
            body["status"] = status
        with self._db.session() as s:
            row = s.get(WebhookDelivery, d.id)
            if row is None:
                return
            row.attempts, row.last_status, row.locked_until = attempts, status, None
            if error is None:
                row.state, row.delivered_at, row.last_error = "delivered", now, None
                event, outcome = AuditEvent.WEBHOOK_DELIVER, "success"
            elif final or attempts >= self._settings.webhook_max_attempts:
                row.state, row.last_error = "failed", error
                event, outcome = AuditEvent.WEBHOOK_FAIL, "failure"
            else:
                row.last_error = error
                row.next_attempt_at = now + backoff(
                    attempts, self._settings.webhook_backoff_seconds,
                    self._settings.webhook_backoff_max_seconds)
                body["next_attempt_at"] = row.next_attempt_at
                event, outcome = AuditEvent.WEBHOOK_RETRY, "retry"
            s.add(row)
            self._audit.append(AuditRecord(
                event=event, tenant_id=d.tenant_id, actor_key_id=None, actor_role="service",
                outcome=outcome, reason=None if error is None else "webhook_delivery_failed",
                object_ids=ids, body={**body, **({"error": error} if error else {})}),
                session=s)
        log.info("webhook_attempt", delivery_id=d.id, state=row.state, attempts=attempts)

    def _check_target(self, url: str) -> None:
        """Refuse loopback, private, link-local and other non-public targets (SSRF)."""
        if self._settings.webhook_allow_insecure:
            return
        host = urlsplit(url).hostname or ""
        port = urlsplit(url).port or 443
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise WebhookUrlInvalidError("the webhook host does not resolve") from exc
        for info in infos:
            addr = ipaddress.ip_address(info[4][0])
            if not addr.is_global:
                raise WebhookUrlInvalidError("the webhook host is not a public address")
