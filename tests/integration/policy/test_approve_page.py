"""The approver's page in headless Chromium against a real uvicorn server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sandboxsec.api.app import create_app
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.integration.policy.conftest import PAYMENT, allow_key_approvals, make_session
from tests.support.serve import bound_socket, in_thread
from tests.support.sessionkeys import ProofAuth

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class Live:
    base: str
    services: Services
    tenant: TenantKeys
    session_id: str


@pytest.fixture
def live(settings: Settings, sqlite_database: Database) -> Iterator[Live]:
    """uvicorn serving the app on a free port of 127.0.0.1, in a thread."""
    sock, port = bound_socket()
    # Session proofs name the URL the agent calls.
    services = Services(settings.model_copy(update={"public_url": f"http://127.0.0.1:{port}"}),
                        db=sqlite_database)
    tenant = make_tenant(services, "browser-tenant")
    allow_key_approvals(services, tenant)  # the page's API-key mode (machines, legacy)
    sid = make_session(services, tenant)
    try:
        with in_thread(create_app(services), sock, lifespan="on"):
            yield Live(f"http://127.0.0.1:{port}", services, tenant, sid)
    finally:
        services.close()


def _agent(live: Live) -> httpx.Client:
    # The agent's requests carry a proof by the session's key.
    return httpx.Client(auth=ProofAuth(live.services.clock.now), timeout=40)


def _request_payment(live: Live) -> dict[str, Any]:
    with _agent(live) as agent:
        r = agent.post(f"{live.base}/v1/actions", headers=live.tenant.headers("agent"), json={
            "session_id": live.session_id, "action": "payment", "resource": "payee:acme-gmbh",
            "params": PAYMENT})
    assert r.status_code == 200 and r.json()["decision"] == "approval_required"
    return dict(r.json())


def test_approver_approves_in_the_browser_and_the_agent_wakes(live: Live) -> None:
    from playwright.sync_api import expect, sync_playwright

    action = _request_payment(live)
    aid = action["approval_id"]
    woke: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: woke.append(_agent(live).get(
        f"{live.base}/v1/approvals/{aid}/wait", params={"timeout": 30, "session_id":
                                                        live.session_id},
        headers=live.tenant.headers("agent"))))
    waiter.start()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            response = page.goto(f"{live.base}/approve/{aid}")
            assert response is not None and response.ok
            assert response.headers["x-frame-options"] == "DENY"
            page.fill("#key", live.tenant.keys["approver"])
            page.click("#load")
            # What the person sees is exactly what the agent asked for.
            expect(page.locator("#amount")).to_have_text("125.50")
            assert page.text_content("#currency") == "EUR"
            assert page.text_content("#payee") == "acme-gmbh"
            assert page.text_content("#session") == live.session_id
            assert page.text_content("#short-code") == action["short_code"]
            assert page.text_content("#params-hash") == action["params_hash"]
            assert page.text_content("#state") == "pending"
            page.click("#approve")
            expect(page.locator("#result")).to_have_text("Approved.")
            assert page.text_content("#state") == "approved"
        finally:
            browser.close()

    waiter.join(40)
    assert woke and woke[0].status_code == 200
    assert woke[0].json()["state"] == "approved"
    assert woke[0].json()["grant"].count(".") == 2


def test_agent_key_in_the_page_cannot_approve(live: Live) -> None:
    from playwright.sync_api import expect, sync_playwright

    aid = _request_payment(live)["approval_id"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # The key may come in the fragment, which never reaches the server.  An agent
            # key sees an approval only with a proof of its session: the page shows nothing.
            page.goto(f"{live.base}/approve/{aid}#key={live.tenant.keys['agent']}")
            expect(page.locator("#result")).to_contain_text("dpop_proof_missing")
            assert "#key" not in page.url
            assert page.text_content("#amount") in ("", None)
            assert not page.is_visible("#approve")
        finally:
            browser.close()
    # And the API behind the page refuses the agent key the approve itself.
    r = httpx.post(f"{live.base}/v1/approvals/{aid}/approve", headers=live.tenant.headers("agent"),
                   json={"params_hash": "0" * 64})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.get(f"{live.base}/v1/approvals/{aid}", headers=live.tenant.headers("approver"))
    assert r.json()["state"] == "pending"


def test_page_shows_hidden_characters_of_stored_requests_visibly(live: Live) -> None:
    """A request stored before the input checks (or by another version) holding bidi controls
    and invisible characters: the page writes each one out instead of letting it reorder or
    hide text."""
    from datetime import timedelta

    from playwright.sync_api import expect, sync_playwright

    from sandboxsec.ids import new_id
    from sandboxsec.policy.canonical import canonical_json, params_hash, short_code
    from sandboxsec.policy.models import ApprovalRequest

    params = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh",
              "memo": "refund \u202e0001 ruo\u200by"}
    now = live.services.clock.now()
    aid = new_id("apr")
    h = params_hash(params)
    with live.services.db.session() as s:
        s.add(ApprovalRequest(
            id=aid, tenant_id=live.tenant.id, session_id=live.session_id, action="payment",
            resource="payee:acme\u2066-gmbh", params_json=canonical_json(params).decode(),
            params_hash=h, short_code=short_code(h), state="pending",
            requested_by=live.tenant.key_ids["agent"], decision_id=new_id("dec"),
            rule_id="pay-approval", reason="stored earlier", image_name="img\u202etxt.exe",
            image_digest="sha256:" + "ab" * 32, attested=True, created_at=now,
            expires_at=now + timedelta(seconds=300)))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{live.base}/approve/{aid}#key={live.tenant.keys['approver']}")
            expect(page.locator("#amount")).to_have_text("125.50")
            shown = page.text_content("#params") or ""
            assert "<U+202E>" in shown and "<U+200B>" in shown
            assert "\u202e" not in shown and "\u200b" not in shown
            assert page.text_content("#payee") == "acme<U+2066>-gmbh"
            assert "<U+202E>" in (page.text_content("#image") or "")
            # The hash still matches: the page shows the stored params, made visible.
            assert page.text_content("#params-hash") == h
        finally:
            browser.close()
