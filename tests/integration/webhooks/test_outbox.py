"""Per-tenant webhooks from the persistent outbox: signed, retried with backoff, visible and
audited, and delivered after a restart of the service in the middle of retrying."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook

from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.integration.policy.conftest import PAYMENT, make_session
from tests.integration.policy.test_wakeup_webhook import _Receiver


def Receiver(failures: int) -> _Receiver:
    """A real HTTP endpoint that answers 503 to its first ``failures`` requests, then 204."""
    return _Receiver(fail=failures)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = Receiver(failures=2)
    yield r
    r.close()


def _insecure(settings: Settings, **kw: Any) -> Settings:
    return settings.model_copy(update={"webhook_allow_insecure": True, **kw})


def test_urls_must_be_https_on_public_hosts(client: TestClient, tenant: TenantKeys) -> None:
    h = tenant.headers("admin")
    for url in ("http://hooks.example/x", "ftp://hooks.example/x",
                "https://user:pw@hooks.example/x", "https://hooks.example/x#frag", "nope"):
        r = client.post("/v1/webhooks", headers=h, json={"url": url})
        assert r.status_code == 400 and r.json()["error"]["code"] == "webhook_url_invalid", url
    r = client.post("/v1/webhooks", headers=h, json={"url": "https://127.0.0.1:1/x"})
    assert r.status_code == 201 and r.json()["secret"].startswith("whsec_")
    listed = client.get("/v1/webhooks", headers=h).json()
    assert len(listed) == 1 and "secret" not in listed[0]


def test_private_target_is_not_contacted(services: Services, tenant: TenantKeys,
                                         receiver: _Receiver, clock: FixedClock) -> None:
    """Without the development switch, a webhook resolving to a loopback address is refused
    at delivery time (no request leaves), recorded and retried."""
    from sandboxsec.principal import Principal, Role

    admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
    hook = services.webhooks.create(admin, receiver.url.replace("http://", "https://"))
    _request(services, tenant)
    with httpx.Client() as c:
        assert services.webhooks.run_once(c) == 1
    assert receiver.calls == []
    d = services.webhooks.deliveries(admin, hook.id)[0]
    assert d.state == "pending" and d.attempts == 1 and "public" in (d.last_error or "")


def _request(services: Services, tenant: TenantKeys) -> str:
    from sandboxsec.principal import Principal, Role

    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    result = services.policy.request_action(agent, session_id=make_session(services, tenant),
                                            action="payment", resource="payee:acme-gmbh",
                                            params=PAYMENT)
    assert result.approval is not None
    return result.approval.id


def test_delivery_is_signed_retried_visible_and_audited(
        settings: Settings, database: Database, clock: FixedClock,
        receiver: _Receiver) -> None:
    from sandboxsec.api.app import create_app

    services = Services(_insecure(settings), clock=clock, db=database)
    try:
        tenant = make_tenant(services, "hooks")
        other = make_tenant(services, "others")
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            services.webhooks.close()  # this test drives the worker itself, step by step
            r = client.post("/v1/webhooks", headers=tenant.headers("admin"),
                            json={"url": receiver.url})
            assert r.status_code == 201, r.text
            hook_id, secret = r.json()["webhook_id"], r.json()["secret"]
            aid = _request(services, tenant)
            _request(services, other)  # another tenant's event never reaches this webhook
            with httpx.Client() as c:
                assert services.webhooks.run_once(c) == 1  # 503
                assert services.webhooks.run_once(c) == 0  # not due yet: backoff
                clock.advance(seconds=settings.webhook_backoff_seconds)
                assert services.webhooks.run_once(c) == 1  # 503 again
                clock.advance(seconds=settings.webhook_backoff_seconds)
                assert services.webhooks.run_once(c) == 0  # the backoff doubled
                clock.advance(seconds=settings.webhook_backoff_seconds)
                assert services.webhooks.run_once(c) == 1  # 204
            deliveries = client.get(f"/v1/webhooks/{hook_id}/deliveries",
                                    headers=tenant.headers("admin")).json()
            assert len(deliveries) == 1
            d = deliveries[0]
            assert (d["state"], d["attempts"], d["last_status"]) == ("delivered", 3, 204)
            r = client.get(f"/v1/webhooks/{hook_id}/deliveries",
                           headers=other.headers("admin"))
            assert r.status_code == 404
        # Every attempt carried the same id and a valid Standard Webhooks signature.
        assert len(receiver.calls) == 3
        ids = {h["webhook-id"] for h, _ in receiver.calls}
        assert ids == {d["delivery_id"]}
        headers, body = receiver.calls[-1]
        # (The test clock is days behind, so the receiver's freshness window is not used:
        # the signature is recomputed with the reference library.)
        sent_at = datetime.fromtimestamp(int(headers["webhook-timestamp"]), tz=UTC)
        assert headers["webhook-signature"] == Webhook(secret).sign(
            headers["webhook-id"], sent_at, body.decode())
        event = json.loads(body)
        assert event["type"] == "approval.requested"
        assert event["data"]["approval_id"] == aid and event["data"]["tenant_id"] == tenant.id
        # Nothing that binds the params leaves: no params, no (guessable) params hash.
        assert not {"params", "params_hash", "params_hmac"} & set(event["data"])
        data = b"".join(services.audit.export(tenant.id))
        events = [json.loads(ln)["event"] for ln in data.splitlines() if ln.startswith(b'{"v":')]
        assert events.count("webhook:delivery:retry") == 2
        assert events.count("webhook:delivery:deliver") == 1
    finally:
        services.close()


def test_failures_stop_after_max_attempts(settings: Settings, database: Database,
                                          clock: FixedClock) -> None:
    from sandboxsec.principal import Principal, Role

    receiver = Receiver(failures=100)
    services = Services(_insecure(settings, webhook_max_attempts=2), clock=clock, db=database)
    try:
        tenant = make_tenant(services, "hooks")
        admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
        hook = services.webhooks.create(admin, receiver.url)
        _request(services, tenant)
        with httpx.Client() as c:
            services.webhooks.run_once(c)
            clock.advance(seconds=3600)
            services.webhooks.run_once(c)
            clock.advance(seconds=3600)
            assert services.webhooks.run_once(c) == 0
        d = services.webhooks.deliveries(admin, hook.id, state="failed")
        assert len(d) == 1 and d[0].attempts == 2 and d[0].last_error == "HTTP 503"
    finally:
        services.close()
        receiver.close()


def test_delivery_survives_a_restart_mid_retry(settings: Settings, database: Database
                                               ) -> None:
    """The service stops after a failed attempt; a new one (a new process in production:
    it shares only the database) finds the delivery in the outbox and completes it."""
    receiver = Receiver(failures=1)
    cfg = _insecure(settings, webhook_backoff_seconds=0.2, webhook_poll_seconds=0.05)
    first = Services(cfg, db=database)
    try:
        tenant = make_tenant(first, "hooks")
        from sandboxsec.principal import Principal, Role

        admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
        hook = first.webhooks.create(admin, receiver.url)
        _request(first, tenant)
        first.webhooks.start()
        deadline = time.monotonic() + 20
        while not receiver.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        first.webhooks.close()  # stop mid-retry: one failed attempt, the next one pending
    finally:
        first.close()
    database_again = Database(database.url)
    second = Services(cfg, db=database_again)
    try:
        pending = second.webhooks.deliveries(admin, hook.id)
        assert [(d.state, d.attempts) for d in pending] == [("pending", 1)]
        second.webhooks.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = second.webhooks.deliveries(admin, hook.id, state="delivered")
            if done:
                break
            time.sleep(0.05)
        assert done and done[0].attempts == 2
        assert len(receiver.calls) == 2
        assert receiver.calls[0][0]["webhook-id"] == receiver.calls[1][0]["webhook-id"]
    finally:
        second.close()
        receiver.close()
