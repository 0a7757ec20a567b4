"""Actions, approvals and grants through the HTTP API, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.clock import FixedClock
from sandboxsec.policy.approvals import ApprovalEvent
from sandboxsec.policy.canonical import params_hash
from sandboxsec.policy.errors import ApprovalNotPendingError, GrantAlreadyUsedError
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import PAYMENT, ActFn, allow_key_approvals, make_session


@pytest.fixture(autouse=True)
def _key_approvals(services: Services, tenant: TenantKeys) -> None:
    """These tests drive the machine path: approver API keys decide."""
    allow_key_approvals(services, tenant)


def _code(resp: Any) -> str:
    return str(resp.json()["error"]["code"])


def _approval(client: TestClient, tenant: TenantKeys, aid: str, role: str = "approver") -> Any:
    return client.get(f"/v1/approvals/{aid}", headers=tenant.headers(role))


def _decide(client: TestClient, tenant: TenantKeys, aid: str, verb: str,
            p_hash: str, role: str = "approver") -> Any:
    return client.post(f"/v1/approvals/{aid}/{verb}", json={"params_hash": p_hash},
                       headers=tenant.headers(role))


def _verify(client: TestClient, tenant: TenantKeys, grant: str, params: dict[str, Any],
            action: str = "payment", role: str = "auditor", **extra: Any) -> Any:
    return client.post("/v1/grants/verify", headers=tenant.headers(role),
                       json={"grant": grant, "action": action, "params": params, **extra})


def _principal(tenant: TenantKeys, role: Role) -> Principal:
    return Principal(tenant.id, tenant.key_ids[str(role)], role)


def test_payment_waits_for_approval_then_grant_is_valid_once(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    r = act()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] == "approval_required"
    assert body["rule_id"] == "pay-approval" and "pay-approval" in body["reason"]
    assert body["params_hash"] == params_hash(PAYMENT)
    assert "grant" not in body
    aid = body["approval_id"]

    # The approver sees exactly the params the agent sent, and the same short code.
    shown = _approval(client, tenant, aid).json()
    assert shown["state"] == "pending" and shown["params"] == PAYMENT
    assert shown["short_code"] == body["short_code"] and "grant" not in shown

    approved = _decide(client, tenant, aid, "approve", shown["params_hash"])
    assert approved.status_code == 200 and approved.json()["state"] == "approved"

    # The agent picks up its grant; the approver never sees it.
    assert "grant" not in _approval(client, tenant, aid).json()
    grant = _approval(client, tenant, aid, role="agent").json()["grant"]
    assert grant.count(".") == 2

    ok = _verify(client, tenant, grant, PAYMENT, resource="payee:acme-gmbh")
    assert ok.status_code == 200 and ok.json()["valid"] is True
    assert ok.json()["approval_id"] == aid
    again = _verify(client, tenant, grant, PAYMENT)
    assert again.status_code == 409 and _code(again) == "grant_already_used"
    assert _approval(client, tenant, aid).json()["state"] == "consumed"

    events = [e["event"] for e in services.audit.entries(tenant.id)]
    for expected in ("policy:action:decide", "approval:request:create",
                     "approval:request:approve", "grant:grant:issue", "grant:grant:verify",
                     "grant:grant:reject"):
        assert expected in events


def test_deny_flow(client: TestClient, tenant: TenantKeys, act: ActFn) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    denied = _decide(client, tenant, aid, "deny", h)
    assert denied.status_code == 200 and denied.json()["state"] == "denied"
    view = _approval(client, tenant, aid, role="agent").json()
    assert view["state"] == "denied" and "grant" not in view
    # Decided once: approving afterwards is refused.
    late = _decide(client, tenant, aid, "approve", h)
    assert late.status_code == 409 and _code(late) == "approval_not_pending"


def test_agent_key_cannot_approve(client: TestClient, tenant: TenantKeys, act: ActFn) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    for role in ("agent", "admin", "auditor"):
        r = _decide(client, tenant, aid, "approve", h, role=role)
        assert r.status_code == 403 and _code(r) == "forbidden"
    assert _approval(client, tenant, aid).json()["state"] == "pending"


def test_other_tenant_sees_nothing(client: TestClient, tenant: TenantKeys,
                                   other_tenant: TenantKeys, act: ActFn,
                                   session_id: str) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    for r in (_approval(client, other_tenant, aid),
              _approval(client, other_tenant, aid, role="agent"),
              _decide(client, other_tenant, aid, "approve", h),
              client.get(f"/v1/approvals/{aid}/wait?timeout=0",
                         headers=other_tenant.headers("agent"))):
        assert r.status_code == 404 and _code(r) == "not_found"
    missing = _approval(client, tenant, "apr_" + "0" * 32)
    assert missing.status_code == 404 and _code(missing) == "not_found"
    # Nor can another tenant's agent act in this tenant's session.
    r = act(who=other_tenant)
    assert r.status_code == 404 and _code(r) == "not_found"
    assert _approval(client, tenant, aid).json()["state"] == "pending"


def test_approver_must_send_the_hash_shown(client: TestClient, tenant: TenantKeys,
                                           act: ActFn) -> None:
    aid = act().json()["approval_id"]
    other_hash = params_hash({**PAYMENT, "amount": "9999.00"})
    r = _decide(client, tenant, aid, "approve", other_hash)
    assert r.status_code == 422 and _code(r) == "approval_params_mismatch"
    assert _approval(client, tenant, aid).json()["state"] == "pending"


def test_params_changed_after_approval_refused(client: TestClient, tenant: TenantKeys,
                                               act: ActFn) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    _decide(client, tenant, aid, "approve", h)
    grant = _approval(client, tenant, aid, role="agent").json()["grant"]
    for changed in ({**PAYMENT, "amount": "125.51"}, {**PAYMENT, "iban": "GB00EVIL"},
                    {**PAYMENT, "extra": True}, {k: v for k, v in PAYMENT.items()
                                                 if k != "iban"}):
        r = _verify(client, tenant, grant, changed)
        assert r.status_code == 422 and _code(r) == "grant_params_mismatch"
    r = _verify(client, tenant, grant, PAYMENT, action="login")
    assert r.status_code == 422 and _code(r) == "grant_action_mismatch"
    r = _verify(client, tenant, grant, PAYMENT, resource="payee:evil")
    assert r.status_code == 422 and _code(r) == "grant_resource_mismatch"
    # Refused attempts do not burn the grant for the real execution.
    assert _verify(client, tenant, grant, PAYMENT).status_code == 200


def test_grant_expires(client: TestClient, tenant: TenantKeys, act: ActFn,
                       clock: FixedClock) -> None:
    aid = act().json()["approval_id"]
    _decide(client, tenant, aid, "approve", _approval(client, tenant, aid).json()["params_hash"])
    grant = _approval(client, tenant, aid, role="agent").json()["grant"]
    clock.advance(301)
    r = _verify(client, tenant, grant, PAYMENT)
    assert r.status_code == 422 and _code(r) == "grant_expired"
    assert "grant" not in _approval(client, tenant, aid, role="agent").json()


def test_expired_request_cannot_be_approved(client: TestClient, tenant: TenantKeys,
                                            act: ActFn, clock: FixedClock,
                                            services: Services) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    clock.advance(300)
    r = _decide(client, tenant, aid, "approve", h)
    assert r.status_code == 409 and _code(r) == "approval_expired"
    assert _approval(client, tenant, aid).json()["state"] == "expired"
    events = [e["event"] for e in services.audit.entries(tenant.id)]
    assert "approval:request:expire" in events and "approval:request:refuse" in events


def test_grant_of_other_tenant_and_forged_grants(client: TestClient, tenant: TenantKeys,
                                                 other_tenant: TenantKeys, act: ActFn) -> None:
    r = act("message", "app:slack", {"channel": "ops", "text": "deploy done"})
    assert r.json()["decision"] == "allow"
    grant = r.json()["grant"]
    params = {"channel": "ops", "text": "deploy done"}
    other = _verify(client, other_tenant, grant, params, action="message")
    assert other.status_code == 404 and _code(other) == "grant_not_found"
    head, payload, sig = grant.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    r = _verify(client, tenant, forged, params, action="message")
    assert r.status_code == 422 and _code(r) in ("grant_signature_invalid", "grant_malformed")
    r = _verify(client, tenant, "not-a-grant", params, action="message")
    assert r.status_code == 422 and _code(r) == "grant_malformed"
    assert _verify(client, tenant, grant, params, action="message").status_code == 200


def test_unattested_session_may_not_pay(client: TestClient, tenant: TenantKeys,
                                        act: ActFn, services: Services) -> None:
    sid = make_session(services, tenant, attested=False)
    r = act(sid=sid)
    assert r.status_code == 200
    assert r.json()["decision"] == "deny" and r.json()["rule_id"] == "pay-unattested"
    assert "approval_id" not in r.json() and "grant" not in r.json()


def test_expired_session_refused(client: TestClient, tenant: TenantKeys, act: ActFn,
                                 services: Services, clock: FixedClock) -> None:
    sid = make_session(services, tenant, ttl=60)
    clock.advance(61)
    r = act(sid=sid)
    assert r.status_code == 409 and _code(r) == "action_session_expired"


def test_login_to_new_domain_then_known(client: TestClient, tenant: TenantKeys,
                                        act: ActFn) -> None:
    first = act("login", "domain:Bank.Example", {"username": "ops"})
    assert first.json()["decision"] == "approval_required"
    assert first.json()["rule_id"] == "login-new-domain"
    aid = first.json()["approval_id"]
    _decide(client, tenant, aid, "approve", _approval(client, tenant, aid).json()["params_hash"])
    again = act("login", "domain:bank.example.", {"username": "ops"})
    assert again.json()["decision"] == "allow" and again.json()["rule_id"] == "login-known-domain"
    assert again.json()["grant"].count(".") == 2
    other = act("login", "domain:elsewhere.example", {"username": "ops"})
    assert other.json()["decision"] == "approval_required"


MALFORMED = [
    ({"amount": 125.5, "currency": "EUR"}, "params_not_canonical"),
    ({"amount": "-5", "currency": "EUR"}, "action_amount_invalid"),
    ({"amount": "1e3", "currency": "EUR"}, "action_amount_invalid"),
    ({"amount": "10.00"}, "action_invalid"),
    ({"amount": "10.00", "currency": "euro"}, "action_invalid"),
    ({"amount": "10.00", "currency": "EUR", "payee": "someone-else"}, "action_invalid"),
]


def test_malformed_actions_refused(act: ActFn, services: Services) -> None:
    for params, code in MALFORMED:
        r = act(params=params)
        assert (r.status_code, _code(r)) == (400, code), params
    r = act(action="Payment!")
    assert r.status_code == 400 and _code(r) == "action_invalid"
    # Nothing was decided, so nothing was opened.
    with services.db.session() as s:
        from sqlmodel import select

        assert s.exec(select(ApprovalRequest)).first() is None


def test_wait_returns_state_and_times_out(client: TestClient, tenant: TenantKeys,
                                          act: ActFn) -> None:
    aid = act().json()["approval_id"]
    pending = client.get(f"/v1/approvals/{aid}/wait?timeout=0.1", headers=tenant.headers("agent"))
    assert pending.status_code == 200 and pending.json()["state"] == "pending"
    r = client.get(f"/v1/approvals/{aid}/wait?timeout=-1", headers=tenant.headers("agent"))
    assert r.status_code == 400
    r = client.get(f"/v1/approvals/{aid}/wait?timeout=1", headers=tenant.headers("approver"))
    assert r.status_code == 403


def test_wait_wakes_on_approval(client: TestClient, tenant: TenantKeys, act: ActFn) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]
    results: list[Any] = []
    waiter = threading.Thread(target=lambda: results.append(client.get(
        f"/v1/approvals/{aid}/wait?timeout=20", headers=tenant.headers("agent"))))
    waiter.start()
    _decide(client, tenant, aid, "approve", h)
    waiter.join(30)
    assert results and results[0].json()["state"] == "approved"
    assert results[0].json()["grant"].count(".") == 2


def _race_once(services: Services, tenant: TenantKeys, aid: str) -> None:
    h = params_hash(PAYMENT)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt(event: ApprovalEvent) -> None:
        who = _principal(tenant, Role.APPROVER)
        barrier.wait()
        try:
            outcomes.append(services.policy.decide(who, aid, event, h).state.value)
        except ApprovalNotPendingError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(e,)) for e in
               (ApprovalEvent.APPROVE, ApprovalEvent.DENY) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes).count("refused") == 3, outcomes
    winner = next(o for o in outcomes if o != "refused")
    with services.db.session() as s:
        row = s.get(ApprovalRequest, aid)
        assert row is not None and row.state == winner


def test_concurrent_decisions_have_one_winner(services: Services, tenant: TenantKeys,
                                              act: ActFn) -> None:
    for _round in range(3):
        _race_once(services, tenant, act().json()["approval_id"])


def test_concurrent_grant_use_has_one_winner(services: Services, tenant: TenantKeys,
                                             act: ActFn) -> None:
    params = {"channel": "ops", "text": "hi"}
    grant = act("message", "app:slack", params).json()["grant"]
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def attempt() -> None:
        who = _principal(tenant, Role.AUDITOR)
        barrier.wait()
        try:
            services.policy.verify_grant(who, token=grant, action="message", params=params)
            outcomes.append("ok")
        except GrantAlreadyUsedError:
            outcomes.append("used")

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ok", "used", "used", "used"]


def test_audit_failure_fails_closed(client: TestClient, tenant: TenantKeys, act: ActFn,
                                    services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    aid = act().json()["approval_id"]
    h = _approval(client, tenant, aid).json()["params_hash"]

    def broken(*_a: Any, **_k: Any) -> Any:
        raise AuditUnavailableError("audit store down")

    monkeypatch.setattr(services.audit_writer, "append", broken)
    monkeypatch.setattr(services.audit_writer, "append_many", broken)
    r = act()
    assert r.status_code == 503 and _code(r) == "audit_unavailable"
    r = _decide(client, tenant, aid, "approve", h)
    assert r.status_code == 503
    monkeypatch.undo()
    # Nothing changed: the request is still pending, and only one request exists.
    assert _approval(client, tenant, aid).json()["state"] == "pending"
    with services.db.session() as s:
        from sqlmodel import select

        assert len(s.exec(select(ApprovalRequest)).all()) == 1


def test_grant_dies_with_its_session(client: TestClient, tenant: TenantKeys, act: ActFn,
                                     services: Services, session_id: str) -> None:
    params = {"channel": "ops", "text": "hi"}
    grant = act("message", "app:slack", params).json()["grant"]
    from sandboxsec.sessions.models import AgentSession

    with services.db.session() as s:
        row = s.get(AgentSession, session_id)
        assert row is not None
        row.ended_at = services.clock.now()
        s.add(row)
    r = _verify(client, tenant, grant, params, action="message")
    assert r.status_code == 422 and _code(r) == "grant_session_ended"


def test_only_the_requesting_agent_key_gets_the_grant(client: TestClient, tenant: TenantKeys,
                                                      act: ActFn, services: Services) -> None:
    aid = act().json()["approval_id"]
    _decide(client, tenant, aid, "approve", _approval(client, tenant, aid).json()["params_hash"])
    second = services.tenants.create_key(tenant.id, Role.AGENT, actor=None)
    view = client.get(f"/v1/approvals/{aid}", headers={"Authorization": f"Bearer {second.key}"})
    assert view.status_code == 200 and view.json()["state"] == "approved"
    assert "grant" not in view.json()
    assert "grant" in _approval(client, tenant, aid, role="agent").json()


def test_grant_key_is_wrapped_and_fails_closed(services: Services, tenant: TenantKeys,
                                               session_id: str) -> None:
    from sandboxsec.policy.errors import GrantKeyUnavailableError
    from sandboxsec.policy.models import GrantSigningKey

    agent = _principal(tenant, Role.AGENT)
    params = {"channel": "ops", "text": "hi"}

    def message(svc: Services) -> Any:
        return svc.policy.request_action(agent, session_id=session_id, action="message",
                                         resource="app:slack", params=params)

    assert message(services).grant is not None
    with services.db.session() as s:
        from sqlmodel import select

        row = s.exec(select(GrantSigningKey)).one()
        assert len(row.private_key) != 32  # wrapped, not the raw Ed25519 seed
        row.private_key = row.private_key[:-1] + bytes([row.private_key[-1] ^ 1])
        s.add(row)
    # A worker that has not cached the key cannot unwrap the tampered one: nothing is issued.
    other = Services(services.settings, clock=services.clock, db=services.db)
    try:
        with pytest.raises(GrantKeyUnavailableError):
            message(other)
    finally:
        other.close(keep_db=True)  # its audit writer thread too, not the shared database


def test_grant_checks_offline_with_published_keys(client: TestClient, tenant: TenantKeys,
                                                  act: ActFn) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sandboxsec.policy.grants import check_grant, decode_grant

    params = {"channel": "ops", "text": "hi"}
    grant = act("message", "app:slack", params).json()["grant"]
    published = client.get("/v1/grants/keys").json()["keys"]  # no key needed
    keys = {kid: Ed25519PublicKey.from_public_bytes(base64.b64decode(raw))
            for kid, raw in published.items()}
    claims = decode_grant(grant, keys)
    assert claims.tenant_id == tenant.id and claims.action == "message"
    check_grant(claims, now=claims.issued_at, action="message", params_hash=params_hash(params))


def test_retried_request_reuses_the_pending_approval_and_floods_are_refused(
        client: TestClient, tenant: TenantKeys, act: ActFn, services: Services) -> None:
    from sandboxsec.policy.decisions import MAX_PENDING_PER_SESSION

    first = act().json()
    again = act().json()
    # An agent retrying (say after a timeout) asks the approver once.
    assert again["approval_id"] == first["approval_id"]
    assert again["decision_id"] != first["decision_id"]
    for i in range(1, MAX_PENDING_PER_SESSION):
        r = act(params={**PAYMENT, "amount": f"{i}.00"})
        assert r.json()["decision"] == "approval_required"
    flood = act(params={**PAYMENT, "amount": "99.00"})
    assert flood.status_code == 409 and _code(flood) == "approval_pending_limit"
    # Answering one makes room again.
    aid = first["approval_id"]
    _decide(client, tenant, aid, "deny", first["params_hash"])
    assert act(params={**PAYMENT, "amount": "99.00"}).json()["decision"] == "approval_required"
    decisions = services.audit.entries(tenant.id, event="policy:action:decide")
    assert any(e["reason"] == "approval_pending_limit" for e in decisions)


def test_approver_lists_pending_requests(client: TestClient, tenant: TenantKeys,
                                         other_tenant: TenantKeys, act: ActFn,
                                         clock: FixedClock, services: Services) -> None:
    first = act().json()["approval_id"]
    clock.advance(200)
    second = act(params={**PAYMENT, "amount": "7.00"}).json()["approval_id"]
    h = tenant.headers("approver")
    listed = client.get("/v1/approvals?state=pending", headers=h).json()
    assert [a["id"] for a in listed] == [second, first]
    assert all("grant" not in a for a in listed)
    clock.advance(150)  # the first is past its expiry, not yet written as expired
    assert [a["id"] for a in client.get("/v1/approvals?state=pending", headers=h).json()] == [
        second]
    expired = client.get("/v1/approvals?state=expired", headers=h).json()
    assert [(a["id"], a["state"]) for a in expired] == [(first, "expired")]
    # Another tenant lists nothing of ours; filters are validated.
    assert client.get("/v1/approvals", headers=other_tenant.headers("approver")).json() == []
    assert client.get("/v1/approvals?state=bogus", headers=h).status_code == 400
    assert client.get("/v1/approvals", headers=tenant.headers("admin")).status_code == 403
