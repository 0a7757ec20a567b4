"""Passkeys in headless Chromium with a virtual authenticator (CDP WebAuthn domain).

The service runs in uvicorn on 127.0.0.1; the browser opens it as ``http://localhost:PORT``
(the RP id is ``localhost``: an IP address is not a valid RP id).  Enrolment, sign-in, the
pending list, approve, deny, and refusals of assertions that are wrong in each way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from sandboxsec.api.app import create_app
from sandboxsec.api.routes.people import COOKIE
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.integration.policy.conftest import make_session
from tests.support.serve import bound_socket, in_thread
from tests.support.sessionkeys import ProofAuth

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--host-resolver-rules=MAP localhost 127.0.0.1"]


@dataclass
class Live:
    origin: str
    other_origin: str
    services: Services
    tenant: TenantKeys

    def api(self, method: str, path: str, role: str = "admin", **kw: Any) -> httpx.Response:
        """A call with the role's API key; an agent's carries a proof by the session's key
        (the session named in the body, or ``params["session_id"]`` for approval reads)."""
        auth = ProofAuth(self.services.clock.now) if role == "agent" else None
        with httpx.Client(auth=auth, timeout=30) as http:
            return http.request(method, f"{self.origin}{path}",
                                headers=self.tenant.headers(role), **kw)


@pytest.fixture
def live(settings: Settings, sqlite_database: Database) -> Iterator[Live]:
    """The service on a free port, and the same service on a second port (another origin)."""
    sock, port = bound_socket()
    other_sock, other_port = bound_socket()
    origin = f"http://localhost:{port}"
    # Session proofs name the URL the agent calls: the same origin the pages are on.
    services = Services(settings.model_copy(update={"public_origin": origin,
                                                    "public_url": origin}),
                        db=sqlite_database)
    tenant = make_tenant(services, "browser-people")
    app = create_app(services, own_services=False)
    try:
        with in_thread(app, sock, lifespan="on"), in_thread(app, other_sock, lifespan="on"):
            yield Live(origin, f"http://localhost:{other_port}", services, tenant)
    finally:
        services.close()


class Person:
    """One person's browser context with its own virtual authenticator."""

    def __init__(self, browser: Any, live: Live, handle: str, groups: list[str]) -> None:
        self.live = live
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.cdp = self.context.new_cdp_session(self.page)
        self.cdp.send("WebAuthn.enable", {"enableUI": False})
        self.authenticator = self.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
            "hasUserVerification": True, "isUserVerified": True,
            "automaticPresenceSimulation": True}})["authenticatorId"]
        r = live.api("POST", "/v1/people", json={"name": handle.title(), "handle": handle,
                                                 "groups": groups})
        assert r.status_code == 201, r.text
        self.person_id = r.json()["person_id"]
        self.enrol_path = r.json()["enrolment"]["enrolment_path"]

    def enrol(self) -> None:
        from playwright.sync_api import expect

        self.page.goto(self.live.origin + self.enrol_path)
        expect(self.page.locator("#handle")).not_to_have_text("")
        self.page.click("#register")
        expect(self.page.locator("#result")).to_have_text("Passkey registered.")

    def sign_in_on_list(self) -> None:
        from playwright.sync_api import expect

        self.page.goto(self.live.origin + "/approve")
        self.page.click("#signin")
        expect(self.page.locator("#who")).to_contain_text("Signed in as")

    def cookie(self) -> str:
        return next(c["value"] for c in self.context.cookies() if c["name"] == COOKIE)

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A call with this person's sign-in, as their page would make it."""
        return httpx.request(method, f"{self.live.origin}{path}", timeout=30, headers={
            "Cookie": f"{COOKIE}={self.cookie()}", "Origin": self.live.origin}, **kw)

    def assertion(self, options: dict[str, Any], page: Any = None) -> dict[str, Any]:
        """The authenticator's answer to ``options``, made in a page (by default this one's)."""
        result: dict[str, Any] = (page or self.page).evaluate(
            "o => window.SandboxsecPasskey.get(o)", options)
        return result


def _owned_payment(live: Live, owner: Person, amount: str = "125.50") -> dict[str, Any]:
    sid = make_session(live.services, live.tenant)
    assert live.api("PUT", f"/v1/sessions/{sid}/owner",
                    json={"person_id": owner.person_id}).status_code == 200
    r = live.api("POST", "/v1/actions", role="agent", json={
        "session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
        "params": {"amount": amount, "currency": "EUR", "payee": "acme-gmbh"}})
    assert r.status_code == 200 and r.json()["decision"] == "approval_required", r.text
    return {**r.json(), "session_id": sid}


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_enrol_sign_in_list_approve_and_deny(live: Live, browser: Any) -> None:
    from playwright.sync_api import expect

    alice = Person(browser, live, "alice", [])
    alice.enrol()
    first = _owned_payment(live, alice)
    second = _owned_payment(live, alice, amount="77.00")
    woke: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: woke.append(live.api(
        "GET", f"/v1/approvals/{first['approval_id']}/wait", role="agent",
        params={"timeout": 30, "session_id": first["session_id"]})))
    waiter.start()
    alice.sign_in_on_list()
    links = alice.page.locator("#list a")
    expect(links).to_have_count(2)
    # Newest first.
    assert links.nth(0).get_attribute("data-approval-id") == second["approval_id"]
    assert second["short_code"] in (links.nth(0).text_content() or "")
    links.nth(1).click()
    expect(alice.page.locator("#amount")).to_have_text("125.50")
    assert alice.page.text_content("#short-code") == first["short_code"]
    assert alice.page.text_content("#params-hash") == first["params_hash"]
    alice.page.click("#approve")
    expect(alice.page.locator("#result")).to_have_text("Approved.")
    waiter.join(40)
    assert woke and woke[0].json()["state"] == "approved"
    assert woke[0].json()["grant"].count(".") == 2  # a compact JWS
    alice.page.goto(f"{live.origin}/approve/{second['approval_id']}")
    expect(alice.page.locator("#amount")).to_have_text("77.00")
    alice.page.click("#deny")
    expect(alice.page.locator("#result")).to_have_text("Denied.")
    alice.page.goto(f"{live.origin}/approve")
    expect(alice.page.locator("#empty")).to_be_visible()


def test_wrong_assertions_are_refused(live: Live, browser: Any) -> None:
    from playwright.sync_api import expect

    alice = Person(browser, live, "alice", [])
    alice.enrol()
    mallory = Person(browser, live, "mallory", [])
    mallory.enrol()
    aid = _owned_payment(live, alice)["approval_id"]
    other = _owned_payment(live, alice, amount="99.00")["approval_id"]
    alice.sign_in_on_list()
    mallory.sign_in_on_list()
    params_hash = alice.api("GET", f"/v1/me/approvals/{aid}").json()["params_hash"]

    def challenge(who: Person, approval_id: str, decision: str = "approve") -> dict[str, Any]:
        r = who.api("POST", f"/v1/me/approvals/{approval_id}/challenge",
                    json={"decision": decision})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def submit(ch: dict[str, Any], cred: dict[str, Any], who: Person = alice) -> str:
        r = who.api("POST", f"/v1/me/approvals/{aid}/approve", json={
            "challenge_id": ch["challenge_id"], "params_hash": params_hash, "credential": cred})
        return str(r.json().get("error", {}).get("code", r.json().get("state")))

    # 1. made on another origin (the same RP id, another port): refused.  The passkey is
    #    copied into a virtual authenticator of a page on that origin.
    ch = challenge(alice, aid)
    elsewhere = alice.context.new_page()
    elsewhere.goto(live.other_origin + "/approve")  # any page of the other origin
    cdp = alice.context.new_cdp_session(elsewhere)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    copy = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
        "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
        "hasUserVerification": True, "isUserVerified": True,
        "automaticPresenceSimulation": True}})["authenticatorId"]
    for c in _export_credentials(alice):
        cdp.send("WebAuthn.addCredential", {"authenticatorId": copy, "credential": c})
    assert submit(ch, alice.assertion(ch, elsewhere)) == "assertion_origin_mismatch"
    elsewhere.close()
    # 2. an assertion for other params (the other request's challenge).
    theirs = challenge(alice, other)
    assert submit(challenge(alice, aid), alice.assertion(theirs)) == \
        "assertion_challenge_mismatch"
    # 3. user not verified.
    alice.cdp.send("WebAuthn.setResponseOverrideBits", {
        "authenticatorId": alice.authenticator, "isBadUV": True})
    ch = challenge(alice, aid)
    assert submit(ch, alice.assertion(ch)) == "assertion_user_not_verified"
    alice.cdp.send("WebAuthn.setResponseOverrideBits", {
        "authenticatorId": alice.authenticator, "isBadUV": False})
    # 4. a person outside the routing: sees nothing, and her assertion is refused.
    mallory.page.goto(f"{live.origin}/approve/{aid}")
    expect(mallory.page.locator("#result")).to_contain_text("not_found")
    ch = challenge(alice, aid)
    anyone = {**ch, "publicKey": {**ch["publicKey"], "allowCredentials": []}}
    assert submit(ch, mallory.assertion(anyone)) == "approval_not_routed"
    # 5. a good one passes, and replaying it is refused.
    ch = challenge(alice, aid)
    cred = alice.assertion(ch)
    assert submit(ch, cred) == "approved"
    assert submit(ch, cred) == "assertion_replayed"


def _export_credentials(person: Person) -> list[dict[str, Any]]:
    creds: list[dict[str, Any]] = person.cdp.send(
        "WebAuthn.getCredentials", {"authenticatorId": person.authenticator})["credentials"]
    return creds


def test_quorum_payment_needs_two_people_in_the_browser(live: Live, browser: Any) -> None:
    from playwright.sync_api import expect

    from sandboxsec.policy.engine import bundled_default_policy

    policy = bundled_default_policy().replace(
        "p, pay-approval, payment, *, amount > 0, approval_required\n",
        "p, pay-large, payment, *, amount > 1000, approval_required\n"
        "route, pay-large, owner|group:treasury, 2, passkey\n"
        "p, pay-approval, payment, *, amount > 0, approval_required\n")
    assert live.api("PUT", "/v1/policy", json={"text": policy}).status_code == 200
    alice, bob = Person(browser, live, "alice", []), Person(browser, live, "bob", ["treasury"])
    alice.enrol()
    bob.enrol()
    payment = _owned_payment(live, alice, amount="5000.00")
    aid, sid = payment["approval_id"], payment["session_id"]
    for person in (alice, bob):
        person.sign_in_on_list()
    alice.page.goto(f"{live.origin}/approve/{aid}")
    expect(alice.page.locator("#amount")).to_have_text("5000.00")
    alice.page.click("#approve")
    expect(alice.page.locator("#result")).to_contain_text("waiting for more people")
    # The same person again: refused.
    alice.page.goto(f"{live.origin}/approve/{aid}")
    expect(alice.page.locator("#quorum")).to_contain_text("you chose approve")
    r = alice.api("POST", f"/v1/me/approvals/{aid}/challenge", json={"decision": "approve"})
    assert r.json()["error"]["code"] == "approval_already_voted"
    assert live.api("GET", f"/v1/approvals/{aid}", role="agent",
                    params={"session_id": sid}).json()["state"] == "pending"
    bob.page.goto(f"{live.origin}/approve/{aid}")
    expect(bob.page.locator("#quorum")).to_contain_text("2 different people (1 so far)")
    bob.page.click("#approve")
    expect(bob.page.locator("#result")).to_have_text("Approved.")
    view = live.api("GET", f"/v1/approvals/{aid}", role="agent",
                    params={"session_id": sid}).json()
    assert view["state"] == "approved" and view["grant"].count(".") == 2
