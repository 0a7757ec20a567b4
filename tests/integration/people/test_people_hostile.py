"""Variants of the wrong decision, each refused with its own reason and deciding nothing:
another tenant's person, another request with the very same params, a counter that does not
move, a disabled person's passkey, an enrolment challenge carried to another link, duplicate
member names on the people's routes (both databases)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.policy.models import GrantRecord
from sandboxsec.sandbox.passkey import SoftPasskey
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.people.conftest import (
    ORIGIN,
    EnrolFn,
    enrol,
    owned_session,
    request_payment,
)

PAGE = {"Origin": ORIGIN}


def _code(r: Any) -> str:
    return str(r.json()["error"]["code"])


def _pending(client: TestClient, tenant: TenantKeys, aid: str) -> bool:
    # An approver key reads any request of the tenant (an agent only its own session's).
    view = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("approver")).json()
    return bool(view["state"] == "pending" and view.get("grant_id") is None)


def test_a_person_of_another_tenant_reaches_nothing(
        client: TestClient, services: Services, tenant: TenantKeys, other_tenant: TenantKeys,
        people: EnrolFn) -> None:
    alice = people("alice")
    eve = enrol(client, other_tenant, "eve")
    eve.signin()
    sid = owned_session(services, client, tenant, alice)
    aid = request_payment(client, tenant, sid)["approval_id"]
    # Eve sees none of tenant A's requests, and cannot ask for a challenge on one.
    assert eve.get("/v1/me/approvals").json() == []
    assert _code(eve.get(f"/v1/me/approvals/{aid}")) == "not_found"
    assert _code(eve.challenge(aid)) == "not_found"
    # Eve's passkey over Alice's challenge, sent in Alice's sign-in: not routed to Eve.
    ch = alice.challenge(aid).json()
    r = alice.decide(aid, challenge=ch, credential=eve.passkey.get(ch))
    assert r.status_code == 403 and _code(r) == "approval_not_routed", r.text
    # Tenant B's admin cannot make Alice the owner of B's sessions, nor Eve A's.
    from tests.integration.policy.conftest import make_session

    b_sid = make_session(services, other_tenant)
    r = client.put(f"/v1/sessions/{b_sid}/owner", headers=other_tenant.headers("admin"),
                   json={"person_id": alice.person_id})
    assert r.status_code == 400 and _code(r) == "session_owner_invalid", r.text
    a_sid = make_session(services, tenant)
    r = client.put(f"/v1/sessions/{a_sid}/owner", headers=tenant.headers("admin"),
                   json={"person_id": eve.person_id})
    assert _code(r) == "session_owner_invalid", r.text
    assert _pending(client, tenant, aid)


def test_an_assertion_for_another_request_with_the_same_params_is_refused(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    # The very same payment asked for in two of Alice's sessions: two requests, one hash.
    first = request_payment(client, tenant, owned_session(services, client, tenant, alice))
    second = request_payment(client, tenant, owned_session(services, client, tenant, alice))
    assert first["params_hash"] == second["params_hash"]
    a, b = first["approval_id"], second["approval_id"]
    assert a != b
    # Signed for B, sent as the answer to A's challenge: the challenge commits to the id.
    ch_a, ch_b = alice.challenge(a).json(), alice.challenge(b).json()
    r = alice.decide(a, challenge=ch_a, credential=alice.passkey.get(ch_b))
    assert r.status_code == 422 and _code(r) == "assertion_challenge_mismatch", r.text
    # B's own challenge and assertion, sent to A: the challenge is B's, not A's.
    ch_b = alice.challenge(b).json()
    r = alice.decide(a, challenge=ch_b, credential=alice.passkey.get(ch_b))
    assert r.status_code in (404, 409, 422), r.text
    assert _pending(client, tenant, a) and _pending(client, tenant, b)
    # Approving A approves A only.
    assert alice.decide(a).json()["state"] == "approved"
    assert _pending(client, tenant, b)


def test_a_counter_that_does_not_move_is_refused(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")  # signing in moved her counter above 0
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    ch = alice.challenge(aid).json()
    r = alice.decide(aid, challenge=ch, counter_step=0)  # the same count as the sign-in
    assert r.status_code == 422 and _code(r) == "assertion_counter_regressed", r.text
    assert _pending(client, tenant, aid)
    # A later count goes through.
    assert alice.decide(aid).json()["state"] == "approved"


def test_a_disabled_persons_passkey_decides_nothing(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice, bob = people("alice"), people("bob", ["treasury"])
    from tests.integration.people.test_quorum import QUORUM_POLICY

    r = client.put("/v1/policy", headers=tenant.headers("admin"), json={"text": QUORUM_POLICY})
    assert r.status_code == 200, r.text
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice),
                          amount="5000.00")["approval_id"]
    ch = bob.challenge(aid).json()
    shown = ch["params_hash"]
    assertion = bob.passkey.get(ch)
    assert client.delete(f"/v1/people/{bob.person_id}",
                         headers=tenant.headers("admin")).status_code == 200
    # His sign-in ended with him ...
    r = bob.decide(aid, challenge=ch, credential=assertion, params_hash=shown)
    assert r.status_code == 401 and _code(r) == "signin_required", r.text
    # ... and his passkey, carried into Alice's sign-in, is no one's any more.
    ch = alice.challenge(aid).json()
    r = alice.decide(aid, challenge=ch, credential=bob.passkey.get(ch))
    assert r.status_code == 401 and _code(r) == "credential_unknown", r.text
    # He cannot sign in again either.
    opts = client.post("/v1/signin/options", headers=PAGE).json()
    r = client.post("/v1/signin", headers=PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": bob.passkey.get(opts)})
    assert r.status_code in (401, 403, 404, 422) and r.status_code != 200, r.text
    assert _pending(client, tenant, aid)
    with services.db.session() as s:
        assert s.exec(select(GrantRecord).where(GrantRecord.approval_id == aid)).first() is None


def test_an_enrolment_challenge_does_not_carry_to_another_link(
        client: TestClient, tenant: TenantKeys) -> None:
    links = []
    for handle in ("bob", "carol"):
        r = client.post("/v1/people", headers=tenant.headers("admin"),
                        json={"name": handle.title(), "handle": handle})
        links.append(r.json()["enrolment"]["enrolment_path"].rsplit("/", 1)[1])
    bob_link, carol_link = links
    opts = client.post(f"/v1/enroll/{bob_link}/options", headers=PAGE).json()
    pk = SoftPasskey(rp_id="localhost", origin=ORIGIN)
    # Bob's challenge answered at Carol's link: refused, and nobody got a passkey.
    r = client.post(f"/v1/enroll/{carol_link}/register", headers=PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": pk.create(opts)})
    assert 400 <= r.status_code < 500, r.text
    people = client.get("/v1/people", headers=tenant.headers("admin")).json()
    assert all(p["credentials"] == [] for p in people)


def test_people_routes_refuse_duplicate_member_names(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    alice = people("alice")
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": "Bob", "handle": "bob"})
    link = r.json()["enrolment"]["enrolment_path"].rsplit("/", 1)[1]
    body = b'{"decision": "deny", "decision": "approve"}'
    paths = [f"/v1/enroll/{link}/options", f"/v1/enroll/{link}/register",
             "/v1/signin/options", "/v1/signin", "/v1/signout",
             f"/v1/me/approvals/{aid}/challenge", f"/v1/me/approvals/{aid}/approve",
             f"/v1/me/approvals/{aid}/deny"]
    for path in paths:
        r = client.post(path, content=body, headers={**alice.headers(),
                                                     "content-type": "application/json"})
        assert (r.status_code, _code(r)) == (400, "json_duplicate_key"), (path, r.text)
    assert _pending(client, tenant, aid)


def _second_passkey(client: TestClient, tenant: TenantKeys, person_id: str) -> SoftPasskey:
    r = client.post(f"/v1/people/{person_id}/enrolments", headers=tenant.headers("admin"))
    assert r.status_code == 201, r.text
    token = r.json()["enrolment_path"].rsplit("/", 1)[1]
    opts = client.post(f"/v1/enroll/{token}/options", headers=PAGE).json()
    device = SoftPasskey(rp_id="localhost", origin=ORIGIN)
    reg = client.post(f"/v1/enroll/{token}/register", headers=PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": device.create(opts)})
    assert reg.status_code == 201, reg.text
    return device


def _std_b64(b64url_text: str) -> bytes:
    """The audit log's encoding (standard base64) of an id the API shows as base64url."""
    raw = base64.urlsafe_b64decode(b64url_text + "=" * (-len(b64url_text) % 4))
    return base64.b64encode(raw)


def test_a_revoked_passkey_signs_nothing_and_the_other_one_still_does(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn) -> None:
    from sandboxsec.people.audit_verify import AuditDecisionInvalidError, verify_decisions

    alice = people("alice")  # signed in with her first passkey (the laptop)
    phone = _second_passkey(client, tenant, alice.person_id)
    creds = client.get(f"/v1/people/{alice.person_id}",
                       headers=tenant.headers("admin")).json()["credentials"]
    laptop_row = creds[0]["id"]
    aid = request_payment(client, tenant, owned_session(services, client, tenant, alice)
                          )["approval_id"]
    shown = alice.challenge(aid).json()["params_hash"]
    ch = alice.challenge(aid)
    assert ch.status_code == 200
    # The laptop is lost: the admin revokes that passkey only.
    r = client.delete(f"/v1/people/{alice.person_id}/credentials/{laptop_row}",
                      headers=tenant.headers("admin"))
    assert r.status_code == 200, r.text
    listed = {c["id"]: c for c in r.json()["credentials"]}
    assert listed[laptop_row]["revoked_at"] is not None and len(listed) == 2
    # The sign-in made with the laptop ended with it.
    assert _code(alice.get("/v1/me")) == "signin_required"
    # The laptop signs nothing: not a sign-in ...
    opts = client.post("/v1/signin/options", headers=PAGE).json()
    r = client.post("/v1/signin", headers=PAGE, json={
        "challenge_id": opts["challenge_id"], "credential": alice.passkey.get(opts)})
    assert r.status_code == 401 and _code(r) == "credential_revoked", r.text
    # ... nor a decision, even inside a sign-in made with the phone.
    alice.passkey, laptop = phone, alice.passkey
    alice.signin()
    ch = alice.challenge(aid).json()
    allowed = {c["id"] for c in ch["publicKey"].get("allowCredentials", [])}
    assert len(allowed) == 1  # only the phone is offered
    r = alice.decide(aid, challenge=ch, credential=laptop.get(ch), params_hash=shown)
    assert r.status_code == 401 and _code(r) == "credential_revoked", r.text
    assert _pending(client, tenant, aid)
    # The phone still decides.
    assert alice.decide(aid).json()["state"] == "approved"
    # Offline: a decision after the revocation entry of the passkey that signed it is named.
    data = b"".join(services.audit.export(tenant.id))
    assert verify_decisions(data).decisions_verified == 1
    lines = data.splitlines()
    revoke = next(i for i, ln in enumerate(lines) if b'"people:credential:revoke"' in ln)
    approve = next(i for i, ln in enumerate(lines)
                   if b'"event":"approval:request:approve"' in ln)
    # A log edited (and re-signed by whoever holds the audit key) so that the passkey revoked
    # before the approval is the one that signed it: the check names the approval.
    phone_id = next(c for c in listed.values() if c["id"] != laptop_row)["credential_id"]
    laptop_id = listed[laptop_row]["credential_id"]
    forged = lines[revoke].replace(_std_b64(laptop_id), _std_b64(phone_id))
    assert forged != lines[revoke]
    bad = b"\n".join([*lines[:revoke], forged, *lines[revoke + 1:]])
    with pytest.raises(AuditDecisionInvalidError) as err:
        verify_decisions(bad)
    assert err.value.seq == json.loads(lines[approve])["seq"]
