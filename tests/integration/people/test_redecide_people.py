"""A policy change reaches requests routed to people: a stricter policy denies a pending
quorum request (the votes so far count for nothing), raises its quorum, or takes it away from
approver keys; a looser one never lowers what the request needs (both databases)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.policy.engine import bundled_default_policy
from sandboxsec.policy.models import GrantRecord
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.people.conftest import EnrolFn, owned_session, request_payment
from tests.integration.people.test_quorum import QUORUM_POLICY


def _swap(old: str, new: str) -> str:
    text = bundled_default_policy()
    assert old in text
    return text.replace(old, new)


DENY_PAYMENTS = _swap("p, pay-approval, payment, *, amount > 0, approval_required\n",
                      "p, pay-freeze, payment, *, amount > 0, deny\n"
                      "p, pay-approval, payment, *, amount > 0, approval_required\n")
ONE_PERSON = bundled_default_policy()
TWO_PEOPLE = _swap("route, pay-approval, owner, 1, passkey\n",
                   "route, pay-approval, owner|group:treasury, 2, passkey\n")
KEYS_MAY = _swap("route, pay-approval, owner, 1, passkey\n",
                 "route, pay-approval, anyone, 1, key\n")


def _code(r: Any) -> str:
    return str(r.json()["error"]["code"])


def _install(client: TestClient, tenant: TenantKeys, text: str) -> None:
    r = client.put("/v1/policy", headers=tenant.headers("admin"), json={"text": text})
    assert r.status_code == 200, r.text


def _state(client: TestClient, tenant: TenantKeys, aid: str) -> dict[str, Any]:
    return dict(client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json())


def _no_grant(services: Services, aid: str) -> None:
    with services.db.session() as s:
        assert s.exec(select(GrantRecord).where(GrantRecord.approval_id == aid)).first() is None


def test_a_partial_quorum_does_not_survive_a_policy_that_denies(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant, QUORUM_POLICY)
    alice, bob = people("alice"), people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    assert alice.decide(aid).json()["approvals"] == 1
    bob_challenge = bob.challenge(aid).json()  # fetched before the change
    _install(client, tenant, DENY_PAYMENTS)
    # The change denies the request at once, by the policy: it leaves every list.
    view = _state(client, tenant, aid)
    assert view["state"] == "denied" and view["decided_by"] == "policy"
    assert bob.get("/v1/me/approvals").json() == []
    # Bob's assertion over the challenge he got before the change approves nothing.
    r = bob.decide(aid, challenge=bob_challenge)
    assert r.status_code == 409 and _code(r) == "approval_not_pending", r.text
    assert _state(client, tenant, aid)["state"] == "denied"
    _no_grant(services, aid)


def test_a_vote_is_decided_again_when_the_sweep_did_not_run(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep after a change is only for visibility: if it fails (here: it is lost), the
    vote that would complete the quorum is decided again and refused."""
    _install(client, tenant, QUORUM_POLICY)
    alice, bob = people("alice"), people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    assert alice.decide(aid).json()["approvals"] == 1
    monkeypatch.setattr(services.approvals, "sweep_pending", lambda who: None)
    _install(client, tenant, DENY_PAYMENTS)
    assert _state(client, tenant, aid)["state"] == "pending"  # nobody swept it
    r = bob.decide(aid)
    assert r.status_code == 409 and _code(r) == "approval_policy_denied", r.text
    view = _state(client, tenant, aid)
    assert view["state"] == "denied" and view["decided_by"] == "policy"
    _no_grant(services, aid)
    # The refusal is in the log with its reason; no approval entry was written.
    events = [(e["event"], e.get("reason")) for e in _entries(services, tenant)]
    assert ("approval:request:deny", "approval_policy_denied") in events
    assert ("approval:request:refuse", "approval_policy_denied") in events
    assert not any(ev == "approval:request:approve" for ev, _ in events)


def test_a_stricter_quorum_reaches_a_pending_request(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice, bob = people("alice"), people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    _install(client, tenant, TWO_PEOPLE)
    # Opened for one person; the policy now wants two: Alice's approval is not enough.
    first = alice.decide(aid)
    assert first.status_code == 200 and first.json()["state"] == "pending", first.text
    assert "grant" not in _state(client, tenant, aid)
    # Bob is not among the people it was routed to (routing is fixed when it is made), so
    # the request can now only be denied or expire.
    assert bob.get(f"/v1/me/approvals/{aid}").status_code == 404
    _no_grant(services, aid)


def test_a_looser_policy_does_not_lower_a_pending_quorum(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant, TWO_PEOPLE)
    alice, bob = people("alice"), people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    _install(client, tenant, ONE_PERSON)
    assert alice.decide(aid).json()["state"] == "pending"
    assert bob.decide(aid).json()["state"] == "approved"


def test_a_policy_that_now_wants_a_person_takes_a_request_from_keys(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant, KEYS_MAY)
    alice = people("alice")
    action = request_payment(client, tenant, owned_session(services, client, tenant, alice))
    aid = action["approval_id"]
    _install(client, tenant, ONE_PERSON)
    r = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                    json={"params_hash": action["params_hash"]})
    assert r.status_code == 403 and _code(r) == "approval_person_required", r.text
    assert _state(client, tenant, aid)["state"] == "pending"
    # A key may still deny.
    r = client.post(f"/v1/approvals/{aid}/deny", headers=tenant.headers("approver"),
                    json={"params_hash": action["params_hash"]})
    assert r.status_code == 200 and r.json()["state"] == "denied", r.text


def _entries(services: Services, tenant: TenantKeys) -> list[dict[str, Any]]:
    data = b"".join(services.audit.export(tenant.id))
    return [json.loads(line) for line in data.splitlines() if line.startswith(b'{"v":')]


def _grant(client: TestClient, tenant: TenantKeys, aid: str) -> str:
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["state"] == "approved", view
    return str(view["grant"])


def _verify(client: TestClient, tenant: TenantKeys, grant: str, params: dict[str, Any]) -> Any:
    return client.post("/v1/grants/verify", headers=tenant.headers("auditor"),
                       json={"grant": grant, "action": "payment", "params": params})


PARAMS = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh"}


def test_a_grant_approved_by_a_key_needs_a_person_once_the_policy_says_so(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant, KEYS_MAY)
    alice = people("alice")
    action = request_payment(client, tenant, owned_session(services, client, tenant, alice))
    aid = action["approval_id"]
    r = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                    json={"params_hash": action["params_hash"]})
    assert r.status_code == 200, r.text
    grant = _grant(client, tenant, aid)
    _install(client, tenant, ONE_PERSON)
    r = _verify(client, tenant, grant, PARAMS)
    assert (r.status_code, _code(r)) == (422, "grant_policy_denied"), r.text
    # Refused, not spent: under a policy that lets keys approve it is valid again.
    _install(client, tenant, KEYS_MAY)
    assert _verify(client, tenant, grant, PARAMS).status_code == 200


def test_a_grant_needs_the_people_a_stricter_route_asks_for(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    assert alice.decide(aid).json()["state"] == "approved"
    grant = _grant(client, tenant, aid)
    _install(client, tenant, TWO_PEOPLE)
    r = _verify(client, tenant, grant, PARAMS)
    assert (r.status_code, _code(r)) == (422, "grant_policy_denied"), r.text
    _install(client, tenant, ONE_PERSON)
    assert _verify(client, tenant, grant, PARAMS).status_code == 200
