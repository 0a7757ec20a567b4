"""Waking a waiting agent from another worker, and the approver webhook."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState
from sandboxsec.policy.notify import WebhookNotifier, sign, verify_signature
from sandboxsec.policy.views import ApprovalView
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import PAYMENT, allow_key_approvals


def test_wait_wakes_across_workers(services: Services, tenant: TenantKeys,
                                   session_id: str) -> None:
    # Another Services on the same database stands in for another worker process: it shares
    # no memory with this one, so only the database (PostgreSQL NOTIFY, or SQLite's bounded
    # re-read) can wake it.
    allow_key_approvals(services, tenant)
    other = Services(services.settings, clock=services.clock, db=services.db)
    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    approver = Principal(tenant.id, tenant.key_ids["approver"], Role.APPROVER)
    result = services.policy.request_action(agent, session_id=session_id, action="payment",
                                            resource="payee:acme-gmbh", params=PAYMENT)
    assert result.approval is not None
    aid = result.approval.id
    seen: list[ApprovalView] = []
    waiting = threading.Event()

    async def wait() -> None:
        task = asyncio.create_task(other.policy.wait(agent, aid, 8.0))
        while other.policy.wakeups.waiting() == 0:
            await asyncio.sleep(0.01)
        waiting.set()
        seen.append(await task)

    try:
        if services.db.is_postgres:
            other.policy._ensure_listener()
        waiter = threading.Thread(target=lambda: asyncio.run(wait()))
        waiter.start()
        assert waiting.wait(10)
        services.policy.decide(approver, aid, ApprovalEvent.APPROVE, result.params_hash)
        waiter.join(15)
        # 8 s is below the PostgreSQL safety re-read (10 s): there, only NOTIFY can wake it.
        assert seen and seen[0].state is ApprovalState.APPROVED
        assert seen[0].grant is not None
    finally:
        other.close(keep_db=True)  # its audit writer thread too, not the shared database


class _Receiver:
    """A local webhook receiver that fails the first ``fail`` deliveries with 503."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[tuple[dict[str, str], bytes]] = []
        self.done = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                status = 503 if len(receiver.calls) <= receiver.fail else 204
                self.send_response(status)
                self.end_headers()
                if status == 204:
                    receiver.done.set()

            def log_message(self, *_args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    r = _Receiver(fail=2)
    yield r
    r.close()


def test_webhook_signed_and_retried(receiver: _Receiver) -> None:
    notifier = WebhookNotifier(receiver.url, b"s3cret", base_delay=0.01, max_delay=0.05)
    try:
        notifier.submit({"type": "approval.requested", "approval_id": "apr_1"})
        assert receiver.done.wait(10)
    finally:
        notifier.close()
    assert len(receiver.calls) == 3 and notifier.delivered == 1
    headers, body = receiver.calls[-1]
    assert json.loads(body)["approval_id"] == "apr_1"
    ts, sig = headers["X-Sandboxsec-Timestamp"], headers["X-Sandboxsec-Signature"]
    assert verify_signature(b"s3cret", ts, body, sig, now=time.time())
    assert not verify_signature(b"other", ts, body, sig, now=time.time())
    assert not verify_signature(b"s3cret", ts, body + b" ", sig, now=time.time())
    assert not verify_signature(b"s3cret", ts, body, sig, now=time.time() + 3600)
    assert sign(b"k", 1, b"{}") == sign(b"k", 1, b"{}")


def test_webhook_gives_up_after_max_attempts() -> None:
    r = _Receiver(fail=100)
    notifier = WebhookNotifier(r.url, b"k", max_attempts=3, base_delay=0.01, max_delay=0.02)
    try:
        notifier.submit({"type": "x"})
        deadline = time.monotonic() + 10
        while notifier.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        notifier.close()
        r.close()
    assert notifier.failed == 1 and len(r.calls) == 3


def test_approval_request_notifies_webhook(settings: Settings, services: Services,
                                           tenant: TenantKeys, session_id: str,
                                           receiver: _Receiver) -> None:
    receiver.fail = 0
    hooked = Services(settings.model_copy(update={
        "approval_webhook_url": receiver.url, "approval_webhook_secret": "whsec"}),
        clock=services.clock, db=services.db)
    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    try:
        result = hooked.policy.request_action(agent, session_id=session_id, action="payment",
                                              resource="payee:acme-gmbh", params=PAYMENT)
        assert receiver.done.wait(10)
    finally:
        hooked.close(keep_db=True)  # its audit writer thread too, not the shared database
    assert result.approval is not None
    event = json.loads(receiver.calls[0][1])
    assert event["approval_id"] == result.approval.id
    assert event["short_code"] == result.short_code
    # Notification only: no params, no grant in the webhook.
    assert "params" not in event and "grant" not in event
