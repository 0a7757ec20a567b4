"""Quorum: large payments need N distinct people; one deny decides; concurrent votes settle
exactly once (both databases)."""

from __future__ import annotations

import json
import threading
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.policy.engine import bundled_default_policy
from sandboxsec.policy.models import GrantRecord
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.people.conftest import EnrolFn, owned_session, request_payment

# The default policy plus: payments over 1,000 EUR need two people of the treasury group or
# the owner, each with their passkey.
QUORUM_POLICY = bundled_default_policy().replace(
    "p, pay-approval, payment, *, amount > 0, approval_required\n",
    "p, pay-large, payment, *, amount > 1000, approval_required\n"
    "route, pay-large, owner|group:treasury, 2, passkey\n"
    "p, pay-approval, payment, *, amount > 0, approval_required\n")


def _code(r: Any) -> str:
    return str(r.json()["error"]["code"])


def _install(client: TestClient, tenant: TenantKeys) -> None:
    r = client.put("/v1/policy", headers=tenant.headers("admin"), json={"text": QUORUM_POLICY})
    assert r.status_code == 200, r.text


def test_two_different_people_are_needed(client: TestClient, services: Services,
                                         tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant)
    alice, bob = people("alice"), people("bob", ["treasury"])
    carol = people("carol", ["sales"])
    sid = owned_session(services, client, tenant, alice)
    action = request_payment(client, tenant, sid, amount="5000.00")
    aid = action["approval_id"]
    assert action["rule_id"] == "pay-large"
    assert carol.get(f"/v1/me/approvals/{aid}").status_code == 404
    first = alice.decide(aid)
    assert first.status_code == 200, first.text
    assert (first.json()["state"], first.json()["approvals"]) == ("pending", 1)
    # No grant yet; the same person twice is refused.
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["state"] == "pending" and "grant" not in view
    r = alice.challenge(aid)
    assert r.status_code == 409 and _code(r) == "approval_already_voted"
    # An approver API key cannot make up the quorum either.
    r = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                    json={"params_hash": action["params_hash"]})
    assert _code(r) == "approval_person_required"
    second = bob.decide(aid)
    assert second.status_code == 200 and second.json()["state"] == "approved", second.text
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["grant"].count(".") == 2


def test_same_person_with_a_second_challenge_is_refused(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    _install(client, tenant)
    alice = people("alice")
    people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    # Two challenges taken before either is used: the second vote is still refused.
    c1, c2 = alice.challenge(aid).json(), alice.challenge(aid).json()
    assert alice.decide(aid, challenge=c1).json()["state"] == "pending"
    r = alice.decide(aid, challenge=c2)
    assert r.status_code == 409 and _code(r) == "approval_already_voted"


def test_one_deny_decides(client: TestClient, services: Services, tenant: TenantKeys,
                          people: EnrolFn) -> None:
    _install(client, tenant)
    alice, bob = people("alice"), people("bob", ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    assert alice.decide(aid).json()["state"] == "pending"
    r = bob.decide(aid, "deny")
    assert r.status_code == 200 and r.json()["state"] == "denied"
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["state"] == "denied" and "grant" not in view


def test_concurrent_votes_settle_once(client: TestClient, services: Services,
                                      tenant: TenantKeys, people: EnrolFn) -> None:
    """The last two of a quorum of three vote at once: exactly one settles it, with one
    grant; both votes count."""
    _install(client, tenant)
    policy = QUORUM_POLICY.replace("owner|group:treasury, 2,", "owner|group:treasury, 3,")
    assert client.put("/v1/policy", headers=tenant.headers("admin"),
                      json={"text": policy}).status_code == 200
    alice, bob, dave = people("alice"), people("bob", ["treasury"]), people("dave",
                                                                            ["treasury"])
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    assert alice.decide(aid).json()["state"] == "pending"
    prepared = []
    for person in (bob, dave):
        ch = person.challenge(aid).json()
        prepared.append((person, ch, person.passkey.get(ch)))
    results: list[Any] = []
    barrier = threading.Barrier(2)

    def vote(person: Any, ch: dict[str, Any], cred: dict[str, Any]) -> None:
        barrier.wait()
        results.append(person.decide(aid, challenge=ch, credential=cred))

    threads = [threading.Thread(target=vote, args=p) for p in prepared]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r.status_code for r in results) == [200, 200], [r.text for r in results]
    assert alice.get(f"/v1/me/approvals/{aid}").json()["approvals"] == 3
    with services.db.session() as s:
        grants = s.exec(select(GrantRecord).where(GrantRecord.approval_id == aid)).all()
    assert len(grants) == 1
    # One vote entry stayed open, one settled it: the log shows both, and one approval.
    data = b"".join(services.audit.export(tenant.id))
    events = [json.loads(ln)["event"] for ln in data.splitlines() if ln.startswith(b'{"v":')]
    assert events.count("approval:request:vote") == 2  # alice's and the first of the two
    assert events.count("approval:request:approve") == 1
