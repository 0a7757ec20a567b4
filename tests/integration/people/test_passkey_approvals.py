"""People approve with passkeys: enrolment, sign-in, routing to the owner, signed decisions,
and every way a decision can be wrong, each refused with its own reason code."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from sandboxsec.sandbox.passkey import UP, SoftPasskey
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.people.conftest import (
    ORIGIN,
    EnrolFn,
    enrol,
    owned_session,
    request_payment,
)
from tests.integration.policy.conftest import make_session

_PAGE = {"Origin": ORIGIN}


def _code(r: Any) -> str:
    return str(r.json()["error"]["code"])


def _entries(services: Services, tenant: TenantKeys) -> list[dict[str, Any]]:
    data = b"".join(services.audit.export(tenant.id))
    return [json.loads(line) for line in data.splitlines() if line.startswith(b'{"v":')]


def test_owner_approves_with_passkey_and_agent_gets_grant(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    sid = owned_session(services, client, tenant, alice)
    action = request_payment(client, tenant, sid)
    aid = action["approval_id"]
    # The list shows it (newest first) with the exact params and the quorum.
    listed = alice.get("/v1/me/approvals").json()
    assert [a["id"] for a in listed] == [aid]
    assert listed[0]["params"]["amount"] == "125.50" and listed[0]["quorum"] == 1
    assert listed[0]["signer"] == "passkey"
    # An approver API key cannot approve what the policy gives to a person.
    r = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                    json={"params_hash": action["params_hash"]})
    assert r.status_code == 403 and _code(r) == "approval_person_required"
    r = alice.decide(aid)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "approved" and r.json()["my_vote"] == "approve"
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()
    assert view["state"] == "approved" and view["grant"].count(".") == 2
    assert view["decided_by"] == alice.person_id
    # The audit log holds the registration and the signed decision, marked as a passkey's.
    entries = _entries(services, tenant)
    reg = [e for e in entries if e["event"] == "people:credential:register"]
    assert reg and reg[0]["body"]["rp_id"] == "localhost" and reg[0]["body"]["public_key_cose"]
    approve = next(e for e in entries if e["event"] == "approval:request:approve")
    assert approve["actor"] == {"key_id": alice.person_id, "role": "person"}
    assert approve["body"]["signer"] == "passkey"
    assert set(approve["body"]["webauthn"]) >= {"client_data_json", "authenticator_data",
                                                "signature", "credential_id"}
    # The challenge committed to the keyed params digest the log holds, never the plain hash
    # (a guessable digest of payment params).
    preimage = json.loads(approve["body"]["challenge_preimage"])
    assert preimage["params_hmac"] == approve["body"]["params_hmac"]
    assert "params_hash" not in preimage and "params_hash" not in approve["body"]
    assert action["params_hash"] not in json.dumps(entries)
    created = next(e for e in entries if e["event"] == "approval:request:create")
    assert created["body"]["routed_to"] == [alice.person_id]


def test_deny_with_passkey(client: TestClient, services: Services, tenant: TenantKeys,
                           people: EnrolFn) -> None:
    alice = people("alice")
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice))[
        "approval_id"]
    r = alice.decide(aid, "deny")
    assert r.status_code == 200 and r.json()["state"] == "denied", r.text
    assert alice.get("/v1/me/approvals").json() == []


def test_refusals_each_with_its_reason(client: TestClient, services: Services,
                                       tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    sid = owned_session(services, client, tenant, alice)
    aid = request_payment(client, tenant, sid)["approval_id"]
    other = request_payment(client, tenant, sid, amount="99.00")["approval_id"]

    def fresh() -> dict[str, Any]:
        r = alice.challenge(aid)
        assert r.status_code == 200, r.text
        return dict(r.json())

    cases: list[tuple[str, dict[str, Any]]] = [
        ("assertion_origin_mismatch", {"origin": "http://localhost:9999"}),
        ("assertion_origin_mismatch", {"origin": "http://127.0.0.1:8000"}),
        ("assertion_cross_origin", {"extra": {"crossOrigin": True}}),
        ("assertion_cross_origin", {"extra": {"topOrigin": "https://evil.example"}}),
        ("assertion_rp_mismatch", {"rp_id": "evil.example"}),
        ("assertion_user_not_verified", {"flags": UP}),
        ("assertion_signature_invalid", {"bad_signature": True}),
        ("assertion_counter_regressed", {}),
    ]
    for code, kwargs in cases:
        if code == "assertion_counter_regressed":
            # A cloned authenticator: its counter is behind the one the service saw last.
            alice.passkey.counter = 0
        r = alice.decide(aid, challenge=fresh(), **kwargs)
        assert r.status_code in (403, 409, 422), (code, r.text)
        assert _code(r) == code, (code, r.text)
    # An assertion over the challenge of another request (other params) is refused here.
    theirs = alice.challenge(other).json()
    r = alice.decide(aid, challenge=fresh(), credential=alice.passkey.get(theirs))
    assert _code(r) == "assertion_challenge_mismatch"
    # A deny challenge cannot approve.
    deny = alice.challenge(aid, "deny").json()
    r = alice.decide(aid, "approve", challenge=deny)
    assert _code(r) == "assertion_challenge_mismatch"
    # What was shown must be what is decided.
    r = alice.decide(aid, params_hash="0" * 64)
    assert _code(r) == "approval_params_mismatch"
    # None of that decided anything; now a good one does, and its replay is refused.
    assert alice.get(f"/v1/me/approvals/{aid}").json()["state"] == "pending"
    ch = fresh()
    cred = alice.passkey.get(ch)
    assert alice.decide(aid, challenge=ch, credential=cred).json()["state"] == "approved"
    r = alice.decide(aid, challenge=ch, credential=cred)
    assert r.status_code == 409 and _code(r) == "assertion_replayed"
    # Every refusal is audited with its code.
    refused = [e["reason"] for e in _entries(services, tenant)
               if e["event"] == "approval:request:refuse"]
    for code, _ in cases:
        assert code in refused


def test_person_outside_the_routing_sees_and_decides_nothing(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice, mallory = people("alice"), people("mallory")
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice))[
        "approval_id"]
    assert mallory.get("/v1/me/approvals").json() == []
    r = mallory.get(f"/v1/me/approvals/{aid}")
    assert r.status_code == 404 and _code(r) == "not_found"
    assert _code(mallory.challenge(aid)) == "not_found"
    # Mallory's passkey over Alice's challenge, sent in Alice's sign-in, is refused too.
    ch = alice.challenge(aid).json()
    r = alice.decide(aid, challenge=ch, credential=mallory.passkey.get(ch))
    assert r.status_code == 403 and _code(r) == "approval_not_routed"
    assert alice.get(f"/v1/me/approvals/{aid}").json()["state"] == "pending"


def test_signed_in_requests_need_the_cookie_and_the_origin(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice))[
        "approval_id"]
    r = client.get("/v1/me/approvals", headers=tenant.headers("approver"))
    assert r.status_code == 401 and _code(r) == "signin_required"
    r = client.post(f"/v1/me/approvals/{aid}/challenge", json={"decision": "approve"},
                    headers={"Cookie": alice.headers()["Cookie"]})
    assert r.status_code == 403 and _code(r) == "origin_forbidden"
    r = client.post(f"/v1/me/approvals/{aid}/challenge", json={"decision": "approve"},
                    headers=alice.headers(origin="https://evil.example"))
    assert r.status_code == 403 and _code(r) == "origin_forbidden"
    client.post("/v1/signout", headers=alice.headers())
    assert _code(alice.get("/v1/me")) == "signin_required"


def test_enrolment_link_is_single_use_and_registration_is_checked(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": "Bob", "handle": "bob", "groups": ["treasury"]})
    token = r.json()["enrolment"]["enrolment_path"].rsplit("/", 1)[1]
    pk = SoftPasskey(rp_id="localhost", origin=ORIGIN)
    # User verification is required at registration too; a refusal uses up the challenge.
    opts = client.post(f"/v1/enroll/{token}/options", headers=_PAGE).json()
    assert opts["publicKey"]["authenticatorSelection"]["userVerification"] == "required"
    assert opts["publicKey"]["authenticatorSelection"]["residentKey"] == "required"
    r = client.post(f"/v1/enroll/{token}/register", headers=_PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": pk.create(opts, flags=UP)})
    assert r.status_code == 422 and _code(r) == "registration_invalid"
    r = client.post(f"/v1/enroll/{token}/register", headers=_PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": pk.create(opts)})
    assert r.status_code == 409 and _code(r) == "assertion_replayed"
    opts = client.post(f"/v1/enroll/{token}/options", headers=_PAGE).json()
    r = client.post(f"/v1/enroll/{token}/register", headers=_PAGE, json={
        "challenge_id": opts["challenge_id"],
        "credential": pk.create(opts, origin="http://localhost:1")})
    assert _code(r) == "registration_invalid"
    opts = client.post(f"/v1/enroll/{token}/options", headers=_PAGE).json()
    assert client.post(f"/v1/enroll/{token}/register", headers=_PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": pk.create(opts)}).status_code == 201
    # The link is used up.
    r = client.post(f"/v1/enroll/{token}/options", headers=_PAGE)
    assert r.status_code == 404 and _code(r) == "enrolment_invalid"
    # The same passkey cannot be registered for someone else.
    carol = client.post("/v1/people", headers=tenant.headers("admin"),
                        json={"name": "Carol", "handle": "carol"}).json()
    token2 = carol["enrolment"]["enrolment_path"].rsplit("/", 1)[1]
    opts = client.post(f"/v1/enroll/{token2}/options", headers=_PAGE).json()
    r = client.post(f"/v1/enroll/{token2}/register", headers=_PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": pk.create(opts)})
    assert r.status_code == 409 and _code(r) == "credential_duplicate"
    # Handles are unique per tenant.
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": "Bob 2", "handle": "bob"})
    assert r.status_code == 409 and _code(r) == "person_handle_taken"
    people = client.get("/v1/people", headers=tenant.headers("admin")).json()
    assert [p["handle"] for p in people] == ["bob", "carol"]
    assert len(people[0]["credentials"]) == 1 and people[1]["credentials"] == []


def test_only_an_admin_sets_the_owner_once(client: TestClient, services: Services,
                                           tenant: TenantKeys, other_tenant: TenantKeys
                                           ) -> None:
    alice = enrol(client, tenant, "alice")
    bob = enrol(client, tenant, "bob")
    stranger = enrol(client, other_tenant, "eve")
    sid = make_session(services, tenant)
    url = f"/v1/sessions/{sid}/owner"
    r = client.put(url, headers=tenant.headers("agent"), json={"person_id": alice.person_id})
    assert r.status_code == 403 and _code(r) == "forbidden"
    r = client.put(url, headers=tenant.headers("admin"), json={"person_id": stranger.person_id})
    assert r.status_code == 400 and _code(r) == "session_owner_invalid"
    r = client.put(url, headers=other_tenant.headers("admin"),
                   json={"person_id": stranger.person_id})
    assert r.status_code == 404
    assert client.put(url, headers=tenant.headers("admin"),
                      json={"person_id": alice.person_id}).status_code == 200
    r = client.put(url, headers=tenant.headers("admin"), json={"person_id": bob.person_id})
    assert r.status_code == 409 and _code(r) == "session_owner_set"


def test_request_without_owner_reaches_nobody(client: TestClient, services: Services,
                                              tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    sid = make_session(services, tenant)  # no owner assigned
    aid = request_payment(client, tenant, sid)["approval_id"]
    assert alice.get("/v1/me/approvals").json() == []
    assert alice.get(f"/v1/me/approvals/{aid}").status_code == 404
    # The machine path may still stop it: a deny by an approver key decides deny.
    h = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("approver")).json()
    r = client.post(f"/v1/approvals/{aid}/deny", headers=tenant.headers("approver"),
                    json={"params_hash": h["params_hash"]})
    assert r.status_code == 200 and r.json()["state"] == "denied"
    entries = _entries(services, tenant)
    deny = next(e for e in entries if e["event"] == "approval:request:deny")
    assert deny["body"]["signer"] == "api_key" and deny["actor"]["role"] == "approver"
