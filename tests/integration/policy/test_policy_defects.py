"""Hostile tests of the policy defects an outside review found, on SQLite and PostgreSQL.

Each test is named for what it breaks; each failed on the code before the fix.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.api.gate import person_route
from sandboxsec.errors import SandboxSecError
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.service import MAX_PENDING_PER_SESSION
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import ActFn, allow_key_approvals


@pytest.fixture
def key_approvals(services: Services, tenant: TenantKeys) -> None:
    """These tests drive the machine path: approver API keys decide (person-signed approvals
    are tested in tests/integration/people)."""
    allow_key_approvals(services, tenant)


def _code(resp: Any) -> str:
    return str(resp.json()["error"]["code"])


def _put_policy(client: TestClient, tenant: TenantKeys, text: str) -> Any:
    r = client.put("/v1/policy", json={"text": text}, headers=tenant.headers("admin"))
    assert r.status_code == 200, r.text
    return r


DOMAIN_DENY = (
    "p, no-evil, login, domain:evil.example, true, deny\n"
    "p, no-evil-sub, login, domain:*.evil.example, true, deny\n"
    "p, logins, login, *, true, allow\n"
)


DENIED_SPELLINGS = [
    "domain:evil.example", "domain:EVIL.example", "domain:evil.example.", "domain:Evil.Example.",
    "DOMAIN:evil.example", "Domain:evil.example",
    "domain:\uff45\uff56\uff49\uff4c.example",       # full-width letters
    "domain:evil\u3002example",                       # ideographic full stop
    "domain:evil\uff0eexample",                       # full-width full stop
    "domain:WWW.EVIL.EXAMPLE.",
]


def test_domain_deny_not_bypassed_by_spelling(client: TestClient, tenant: TenantKeys,
                                             act: ActFn) -> None:
    _put_policy(client, tenant, DOMAIN_DENY)
    for resource in DENIED_SPELLINGS:
        r = act("login", resource, {"username": "ops"})
        assert r.status_code == 200, r.text
        assert r.json()["decision"] == "deny" and r.json()["rule_id"].startswith("no-evil")
        # The same target named in the params instead of the resource is the same target.
        r = act("login", "url:https://x", {"domain": resource.split(":", 1)[1]})
        assert r.json()["decision"] == "deny", r.text
        assert "grant" not in r.json()


REFUSED_SPELLINGS = [
    "domain:evil%2Eexample", "domain:evil.example%00", "domain: evil.example",
    "domain:evil.example ", "domain:evil\u200b.example", "domain:evil.example\u202e",
    "domain:ev\u0456l.example",                       # Cyrillic i inside a Latin label
    "domain:evil..example", "domain:evil.example..", "domain:*.evil.example",
    "domain:evil\u00a0.example",
]


def test_domain_spellings_without_a_canonical_form_are_refused(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    _put_policy(client, tenant, DOMAIN_DENY)
    for resource in REFUSED_SPELLINGS:
        r = act("login", resource, {"username": "ops"})
        assert r.status_code == 400, r.text
        assert _code(r) in ("action_target_invalid", "action_invalid")
    with services.db.session() as s:
        assert s.exec(select(ApprovalRequest)).first() is None


def test_idna_spellings_are_one_domain(client: TestClient, tenant: TenantKeys,
                                       act: ActFn) -> None:
    _put_policy(client, tenant, "p, no-books, login, domain:xn--bcher-kva.example, true, deny\n"
                                "p, logins, login, *, true, allow\n")
    for resource in ("domain:b\u00fccher.example", "domain:B\u00dcCHER.example.",
                     "domain:xn--bcher-kva.example", "domain:XN--BCHER-KVA.EXAMPLE"):
        r = act("login", resource, {})
        assert r.json()["decision"] == "deny", (resource, r.text)
        assert r.json()["resource"] == "domain:xn--bcher-kva.example"


PAYEE_DENY = (
    "p, no-evil-payee, payment, payee:evil-corp, true, deny\n"
    "p, no-evil-any, *, payee:evil-corp, true, deny\n"
    "p, pay, payment, *, true, allow\n"
    "p, msg, message, *, true, allow\n"
)
EVIL_PAYMENT = {"amount": "10.00", "currency": "EUR", "payee": "evil-corp"}


def test_payee_deny_not_bypassed_by_another_resource_kind(client: TestClient, tenant: TenantKeys,
                                                          act: ActFn) -> None:
    _put_policy(client, tenant, PAYEE_DENY)
    # The resource names something else: the engine still decides on the payee.
    for resource in ("iban:DE89370400440532013000", "acme", "url:https://pay.example/x"):
        r = act("payment", resource, EVIL_PAYMENT)
        assert r.status_code == 200 and r.json()["decision"] == "deny", (resource, r.text)
        assert r.json()["resource"] == "payee:evil-corp"
    # Another target kind in the resource is a second target: refused.
    for resource in ("app:banking", "domain:pay.example"):
        r = act("payment", resource, EVIL_PAYMENT)
        assert (r.status_code, _code(r)) == (400, "action_target_conflict"), resource
    # Any action naming the payee in its params has that target.
    r = act("message", "chat:general", {"payee": "evil-corp", "text": "hi"})
    assert r.json()["decision"] == "deny" and r.json()["rule_id"] == "no-evil-any"
    r = act("message", "app:chat", {"payee": "evil-corp"})
    assert (r.status_code, _code(r)) == (400, "action_target_conflict")
    # A payment names its payee.
    r = act("payment", "iban:DE89370400440532013000", {"amount": "1", "currency": "EUR"})
    assert (r.status_code, _code(r)) == (400, "action_invalid")


PAYEE_SPELLINGS = [
    "EVIL-CORP", "Evil-Corp", "evil-corp ", "evil%2Dcorp", "\uff45vil-corp",
    "\u0435vil-corp",                                 # Cyrillic e
    "evil\u200d-corp", "evil\u2060-corp", "evil-corp\u00ad",
]


def test_payee_spellings_refused_not_rewritten(client: TestClient, tenant: TenantKeys,
                                               act: ActFn) -> None:
    _put_policy(client, tenant, PAYEE_DENY)
    for payee in PAYEE_SPELLINGS:
        for resource, params in ((f"payee:{payee}", {"amount": "10.00", "currency": "EUR"}),
                                 ("payee:evil-corp", {**EVIL_PAYMENT, "payee": payee}),
                                 ("iban:x", {**EVIL_PAYMENT, "payee": payee})):
            r = act("payment", resource, params)
            assert r.status_code == 400, (payee, r.text)
            assert _code(r) in ("action_target_invalid", "action_invalid",
                                "params_text_unsafe")


UNSAFE_CHARS = [
    "\u202e", "\u202d", "\u2066", "\u2067", "\u2068", "\u2069", "\u200e", "\u200f", "\u061c",
    "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u180e", "\u3164", "\u115f",
    "\u2800", "\ufe0f", "\U000e0041", "\u2028", "\u2029", "\u0085", "\r", "\x0b", "\x1b",
    "\u00a0", "\u2007", "\u3000", "\ue000",
]


def test_params_that_display_as_other_text_are_refused(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    base = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh"}
    for char in UNSAFE_CHARS:
        for params in ({**base, "memo": f"invoice {char}1234"},
                       {**base, "lines": [{"text": f"a{char}b"}]},
                       {**base, f"me{char}mo": "x"}):
            r = act("payment", "payee:acme-gmbh", params)
            assert (r.status_code, _code(r)) == (400, "params_text_unsafe"), (repr(char), r.text)
            assert char not in r.json()["error"]["message"]
    with services.db.session() as s:
        assert s.exec(select(ApprovalRequest)).first() is None
    # Line breaks and tabs in free text display as themselves and pass.
    ok = act("payment", "payee:acme-gmbh", {**base, "memo": "line one\nline\ttwo"})
    assert ok.status_code == 200 and ok.json()["decision"] == "approval_required"


DUPLICATE_BODIES = [
    b'{"session_id": "s", "action": "payment", "action": "login", "resource": "payee:a"}',
    b'{"session_id": "s", "action": "payment", "resource": "payee:a", '
    b'"params": {"amount": "1.00", "amount": "9999.00", "currency": "EUR"}}',
    b'{"session_id": "s", "action": "payment", "resource": "payee:a", '
    b'"params": {"amount": "1.00", "\\u0061mount": "9999.00", "currency": "EUR"}}',
    b'{"session_id": "s", "action": "payment", "resource": "payee:a", '
    b'"params": {"x": [{"k": 1, "k": 2}]}}',
]


def test_duplicate_member_names_refused_on_actions(client: TestClient,
                                                   tenant: TenantKeys) -> None:
    for body in DUPLICATE_BODIES:
        r = client.post("/v1/actions", content=body, headers={
            **tenant.headers("agent"), "content-type": "application/json"})
        assert (r.status_code, _code(r)) == (400, "json_duplicate_key")


def test_duplicate_member_names_refused_on_every_route(client: TestClient,
                                                       tenant: TenantKeys) -> None:
    # Every route with a body, found from the API description, so a new route is covered too.
    paths = client.get("/openapi.json").json()["paths"]
    routes = [(method.upper(), path) for path, ops in paths.items() for method in ops
              if method in ("post", "put", "patch", "delete")]
    assert len(routes) >= 10
    body = b'{"a": 1, "b": {"c": 1, "c": 2}}'
    for method, path in routes:
        url = path.replace("{", "").replace("}", "")
        if person_route(url) is not None:
            continue  # no API key there: tests/integration/people/test_person_gate.py
        for role in ("admin", "agent"):
            r = client.request(method, url, content=body, headers={
                **tenant.headers(role), "content-type": "application/json"})
            assert (r.status_code, _code(r)) == (400, "json_duplicate_key"), (method, path)
    # The same body without the repeat is not refused for that reason.
    r = client.post("/v1/actions", json={"a": 1, "b": {"c": 1}}, headers=tenant.headers("agent"))
    assert r.status_code == 400 and _code(r) == "invalid_input"


def test_pending_limit_holds_under_concurrency(services: Services, tenant: TenantKeys,
                                               session_id: str) -> None:
    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    n = MAX_PENDING_PER_SESSION * 3
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            services.policy.request_action(
                agent, session_id=session_id, action="payment", resource="payee:acme-gmbh",
                params={"amount": f"{100 + i}.00", "currency": "EUR"})
            result = "created"
        except SandboxSecError as exc:
            result = exc.reason
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with services.db.session() as s:
        stored = s.exec(select(ApprovalRequest).where(
            ApprovalRequest.session_id == session_id)).all()
    assert len(stored) == MAX_PENDING_PER_SESSION, outcomes
    assert outcomes.count("created") == MAX_PENDING_PER_SESSION
    assert outcomes.count("approval_pending_limit") == n - MAX_PENDING_PER_SESSION


def test_policy_over_the_size_limit_is_413(client: TestClient, tenant: TenantKeys) -> None:
    comment = "# " + "x" * 1000 + "\n"
    big = "p, pay, payment, *, true, allow\n" + comment * 300
    for method, path in (("PUT", "/v1/policy"), ("POST", "/v1/policy/validate")):
        r = client.request(method, path, json={"text": big}, headers=tenant.headers("admin"))
        assert (r.status_code, _code(r)) == (413, "policy_too_large"), r.text
    # Multi-byte characters count in bytes, as documented.
    wide = "p, pay, payment, *, true, allow\n" + ("# " + "\u00e9" * 1000 + "\n") * 140
    r = client.put("/v1/policy", json={"text": wide}, headers=tenant.headers("admin"))
    assert (r.status_code, _code(r)) == (413, "policy_too_large")
    assert client.get("/v1/policy", headers=tenant.headers("admin")).json()["version"] == 0


def test_rule_hidden_after_a_line_separator_is_refused(client: TestClient, tenant: TenantKeys,
                                                       act: ActFn) -> None:
    for sep in ("\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
                "\r\n"):
        text = ("p, no-pay, payment, *, true, deny\n"
                f"# payments are denied{sep}p, allow-all, *, *, true, allow\n")
        r = client.put("/v1/policy", json={"text": text}, headers=tenant.headers("admin"))
        assert (r.status_code, _code(r)) == (400, "policy_invalid")
        assert "line 2" in r.json()["error"]["message"]
    assert client.get("/v1/policy", headers=tenant.headers("admin")).json()["version"] == 0


# --------------------------------------------------------------------------- in flight

def _approve(client: TestClient, tenant: TenantKeys, aid: str) -> Any:
    shown = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("approver")).json()
    return client.post(f"/v1/approvals/{aid}/approve", json={"params_hash": shown["params_hash"]},
                       headers=tenant.headers("approver"))


def _verify(client: TestClient, tenant: TenantKeys, grant: str, action: str,
            params: dict[str, Any]) -> Any:
    return client.post("/v1/grants/verify", json={"grant": grant, "action": action,
                                                  "params": params},
                       headers=tenant.headers("auditor"))


def _payment(i: int) -> dict[str, Any]:
    return {"amount": f"{100 + i}.00", "currency": "EUR", "payee": "acme-gmbh"}


MESSAGE = {"channel": "ops", "text": "deploy done"}


@pytest.mark.usefixtures("key_approvals")
def test_stricter_policy_denies_pending_and_revokes_grants(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    pending = act(params=_payment(1)).json()["approval_id"]
    approved = act(params=_payment(2)).json()["approval_id"]
    assert _approve(client, tenant, approved).status_code == 200
    approved_grant = client.get(f"/v1/approvals/{approved}",
                                headers=tenant.headers("agent")).json()["grant"]
    allowed = act("message", "app:slack", MESSAGE).json()
    assert allowed["decision"] == "allow"

    # After an incident the admin denies everything.
    _put_policy(client, tenant, "p, lockdown, *, *, true, deny\n")

    shown = client.get(f"/v1/approvals/{pending}", headers=tenant.headers("approver")).json()
    assert shown["state"] == "denied" and shown["decided_by"] == "policy"
    r = _approve(client, tenant, pending)
    assert r.status_code == 409
    for grant, action, params in ((approved_grant, "payment", _payment(2)),
                                  (allowed["grant"], "message", MESSAGE)):
        r = _verify(client, tenant, grant, action, params)
        assert (r.status_code, _code(r)) == (422, "grant_policy_denied"), r.text
        assert "lockdown" in r.json()["error"]["message"]
    entries = services.audit.entries(tenant.id)
    reasons = {(e["event"], e.get("reason")) for e in entries}
    assert ("approval:request:deny", "approval_policy_denied") in reasons
    assert ("grant:grant:reject", "grant_policy_denied") in reasons
    # Refused, not used: the grants stay unused (an admin can restore the policy).
    _put_policy(client, tenant, "p, pay, payment, *, true, approval_required\n"
                                "p, msg, message, *, true, allow\n")
    assert _verify(client, tenant, approved_grant, "payment", _payment(2)).status_code == 200
    assert _verify(client, tenant, allowed["grant"], "message", MESSAGE).status_code == 200


def test_change_by_another_node_is_caught_when_approving(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    from datetime import timedelta

    from sandboxsec.ids import new_id
    from sandboxsec.policy.models import PolicyRevision

    aid = act(params=_payment(3)).json()["approval_id"]
    # A revision stored without the sweep (another node, or a sweep that failed).
    text = "p, no-acme, payment, payee:acme-gmbh, true, deny\n"
    compiled = services.policy.validate_policy(text)
    with services.db.session() as s:
        version = 1 + max(s.exec(select(PolicyRevision.version).where(
            PolicyRevision.tenant_id == tenant.id)).all(), default=0)
        s.add(PolicyRevision(id=new_id("pol"), tenant_id=tenant.id, version=version, text=text,
                             sha256=compiled.sha256, rule_count=1,
                             created_at=services.clock.now() + timedelta(seconds=1),
                             created_by=tenant.key_ids["admin"]))
    assert client.get(f"/v1/approvals/{aid}",
                      headers=tenant.headers("approver")).json()["state"] == "pending"
    r = _approve(client, tenant, aid)
    assert (r.status_code, _code(r)) == (409, "approval_policy_denied"), r.text
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["state"] == "denied" and "grant" not in view


@pytest.mark.usefixtures("key_approvals")
def test_grant_issued_without_a_person_needs_one_under_the_new_policy(
        client: TestClient, tenant: TenantKeys, act: ActFn) -> None:
    allowed = act("message", "app:slack", MESSAGE).json()
    assert allowed["decision"] == "allow"
    approved = act(params=_payment(4)).json()["approval_id"]
    _approve(client, tenant, approved)
    grant = client.get(f"/v1/approvals/{approved}",
                       headers=tenant.headers("agent")).json()["grant"]
    pending = act(params=_payment(5)).json()["approval_id"]
    _put_policy(client, tenant, "p, pay, payment, *, true, approval_required\n"
                                "p, msg, message, *, true, approval_required\n")
    r = _verify(client, tenant, allowed["grant"], "message", MESSAGE)
    assert (r.status_code, _code(r)) == (422, "grant_policy_denied")
    # A person approved this one, and the new policy asks no more than a person's approval.
    assert _verify(client, tenant, grant, "payment", _payment(4)).status_code == 200
    # A looser or equal policy leaves pending requests to their person.
    assert _approve(client, tenant, pending).status_code == 200


# --------------------------------------------------------------------------- no-store

@pytest.mark.usefixtures("key_approvals")
def test_answers_carrying_secrets_are_not_cached(client: TestClient, tenant: TenantKeys,
                                                 act: ActFn) -> None:
    answers = []
    allowed = act("message", "app:slack", MESSAGE)
    assert "grant" in allowed.json()
    answers.append(allowed)
    aid = act(params=_payment(6)).json()["approval_id"]
    _approve(client, tenant, aid)
    with_grant = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent"))
    assert "grant" in with_grant.json()
    answers.append(with_grant)
    answers.append(client.get(f"/v1/approvals/{aid}/wait?timeout=0",
                              headers=tenant.headers("agent")))
    key = client.post("/v1/api-keys", json={"role": "agent"}, headers=tenant.headers("admin"))
    assert key.status_code == 201 and "key" in key.json()
    answers.append(key)
    # Errors and middleware refusals too.
    answers.append(client.get("/v1/tenant"))
    answers.append(client.post("/v1/actions", content=b'{"a":1,"a":2}',
                               headers=tenant.headers("agent")))
    answers.append(client.get("/v1/approvals/nope", headers=tenant.headers("agent")))
    for r in answers:
        assert r.headers.get("cache-control") == "no-store", (r.request.url, r.headers)


def test_downstream_may_name_the_resource_in_any_spelling(client: TestClient,
                                                          tenant: TenantKeys,
                                                          act: ActFn) -> None:
    _put_policy(client, tenant, "p, logins, login, *, true, allow\n")
    r = act("login", "domain:Bank.Example.", {"username": "ops"})
    assert r.json()["resource"] == "domain:bank.example"
    ok = client.post("/v1/grants/verify", headers=tenant.headers("auditor"), json={
        "grant": r.json()["grant"], "action": "login", "params": {"username": "ops"},
        "resource": "DOMAIN:BANK.EXAMPLE"})
    assert ok.status_code == 200 and ok.json()["resource"] == "domain:bank.example"
    r = act("login", "domain:bank.example", {"username": "ops"})
    other = client.post("/v1/grants/verify", headers=tenant.headers("auditor"), json={
        "grant": r.json()["grant"], "action": "login", "params": {"username": "ops"},
        "resource": "domain:evil.example"})
    assert (other.status_code, _code(other)) == (422, "grant_resource_mismatch")
