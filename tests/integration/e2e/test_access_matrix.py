"""Who may call what, and no tenant reaches another's objects.

The expected table is written out here from the public contract (not derived from the role
file), so a change to the role file that widens access fails this test.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_session

ALL = {"admin", "agent", "approver", "auditor"}
PUBLIC: set[str] = set()
#: No API key reaches these: they take a person's passkey sign-in cookie (401 for any key).
PERSON: set[str] = set()
#: No key needed, but only the configured public origin may call them (403 without it).
ORIGIN: set[str] = set()

# (method, path template) -> roles allowed.  PUBLIC means no key is needed at all.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/tenant"): ALL,
    ("DELETE", "/v1/tenant"): {"admin"},
    ("GET", "/v1/api-keys"): {"admin"},
    ("POST", "/v1/api-keys"): {"admin"},
    ("DELETE", "/v1/api-keys/{key_id}"): {"admin"},
    ("POST", "/v1/attestation/challenge"): {"agent"},
    ("POST", "/v1/attestation/verify"): {"agent"},
    ("POST", "/v1/attestation/ak/challenge"): {"agent"},
    ("POST", "/v1/attestation/ak/activate"): {"agent"},
    ("GET", "/v1/attestation/keys"): PUBLIC,
    ("POST", "/v1/sessions"): {"agent"},
    ("GET", "/v1/sessions/{session_id}"): {"agent", "admin"},
    ("POST", "/v1/sessions/{session_id}/end"): {"agent", "admin"},
    ("POST", "/v1/actions"): {"agent"},
    ("GET", "/v1/approvals"): {"agent", "approver"},
    ("GET", "/v1/approvals/{approval_id}"): {"agent", "approver"},
    ("GET", "/v1/approvals/{approval_id}/wait"): {"agent"},
    ("POST", "/v1/approvals/{approval_id}/approve"): {"approver"},
    ("POST", "/v1/approvals/{approval_id}/deny"): {"approver"},
    ("POST", "/v1/grants/verify"): ALL,
    ("GET", "/v1/grants/keys"): PUBLIC,
    ("GET", "/v1/grants/jwks"): PUBLIC,
    ("GET", "/v1/policy"): {"admin"},
    ("PUT", "/v1/policy"): {"admin"},
    ("POST", "/v1/policy/validate"): {"admin"},
    ("POST", "/v1/sessions/{session_id}/trajectory"): {"agent"},
    ("GET", "/v1/sessions/{session_id}/trajectory"): {"admin"},
    ("GET", "/v1/sessions/{session_id}/trajectory/{record_id}"): {"admin"},
    ("GET", "/v1/sessions/{session_id}/trajectory/{record_id}/data"): {"admin"},
    ("GET", "/v1/keys"): {"admin"},
    ("POST", "/v1/keys/rotate"): {"admin"},
    ("POST", "/v1/keys/rewrap"): {"admin"},
    ("POST", "/v1/keys/retire"): {"admin"},
    ("GET", "/v1/audit/checkpoint"): {"auditor"},
    ("GET", "/v1/audit/export"): {"auditor"},
    ("GET", "/v1/audit/keys"): {"auditor"},
    ("GET", "/v1/audit/proof"): {"auditor"},
    ("GET", "/v1/audit/consistency"): {"auditor"},
    ("POST", "/v1/audit/hash"): {"auditor"},
    ("POST", "/v1/people"): {"admin"},
    ("GET", "/v1/people"): {"admin"},
    ("GET", "/v1/people/{person_id}"): {"admin"},
    ("POST", "/v1/people/{person_id}/enrolments"): {"admin"},
    ("DELETE", "/v1/people/{person_id}"): {"admin"},
    ("DELETE", "/v1/people/{person_id}/credentials/{credential_id}"): {"admin"},
    ("PUT", "/v1/sessions/{session_id}/owner"): {"admin"},
    ("POST", "/v1/enroll/{token}/options"): ORIGIN,
    ("POST", "/v1/enroll/{token}/register"): ORIGIN,
    ("POST", "/v1/signin/options"): ORIGIN,
    ("POST", "/v1/signin"): ORIGIN,
    ("POST", "/v1/signout"): ORIGIN,
    ("GET", "/v1/me"): PERSON,
    ("GET", "/v1/me/approvals"): PERSON,
    ("GET", "/v1/me/approvals/{approval_id}"): PERSON,
    ("POST", "/v1/me/approvals/{approval_id}/challenge"): PERSON,
    ("POST", "/v1/me/approvals/{approval_id}/approve"): PERSON,
    ("POST", "/v1/me/approvals/{approval_id}/deny"): PERSON,
    ("POST", "/v1/webhooks"): {"admin"},
    ("GET", "/v1/webhooks"): {"admin"},
    ("DELETE", "/v1/webhooks/{webhook_id}"): {"admin"},
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): {"admin"},
}


def _routes(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    return [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops
            if p.startswith("/v1/")]


def test_every_route_is_in_the_expected_table(client: TestClient) -> None:
    routes = set(_routes(client))
    assert routes - set(EXPECTED) == set(), "new routes: add them to EXPECTED with their roles"
    assert set(EXPECTED) - routes == set(), "routes in EXPECTED that the app no longer has"


@pytest.fixture
def objects(client: TestClient, services: Services, tenant: TenantKeys) -> dict[str, str]:
    """Tenant A's objects: a session, an approval, a trajectory record, a key id."""
    sid = make_session(services, tenant)
    r = client.post("/v1/actions", headers=tenant.headers("agent"), json={
        "session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
        "params": {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh"}})
    assert r.status_code == 200 and r.json()["decision"] == "approval_required", r.text
    approval_id = r.json()["approval_id"]
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "action", "data": base64.b64encode(b"x").decode(), "meta": {}})
    assert r.status_code in (200, 201), r.text
    record_id = r.json()["record_id"]
    r = client.post("/v1/api-keys", headers=tenant.headers("admin"), json={"role": "agent"})
    assert r.status_code == 201
    key_id = r.json()["key_id"]
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": "Alice", "handle": "alice"})
    assert r.status_code == 201, r.text
    person_id = r.json()["person_id"]
    r = client.post("/v1/webhooks", headers=tenant.headers("admin"),
                    json={"url": "https://hooks.example/approvals"})
    assert r.status_code == 201, r.text
    return {"session_id": sid, "approval_id": approval_id, "record_id": record_id,
            "key_id": key_id, "person_id": person_id, "webhook_id": r.json()["webhook_id"],
            "token": "enr_" + "0" * 40, "credential_id": "cred_" + "0" * 32}


def _url(path: str, ids: dict[str, str]) -> str:
    for name, value in ids.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, path
    if path.endswith("/wait"):
        path += "?timeout=0"
    return path


def _call(client: TestClient, method: str, url: str, headers: dict[str, str]) -> Any:
    body: Any = {} if method in ("POST", "PUT", "DELETE") else None
    # Well-formed bodies where a route validates them before looking the object up.
    if url.endswith(("/approve", "/deny")):
        body = {"params_hash": "0" * 64}
    elif url.endswith("/trajectory") and method == "POST":
        body = {"kind": "action", "data": "eA==", "meta": {}}
    elif url.endswith("/owner"):
        body = {"person_id": "per_" + "0" * 32}
    if url.endswith("/tenant") and method == "DELETE":
        body = {"confirm_name": "not-the-name"}  # never actually delete in this matrix
    return client.request(method, url, headers=headers, json=body)


def test_each_role_reaches_exactly_its_routes(client: TestClient, tenant: TenantKeys,
                                              objects: dict[str, str]) -> None:
    for (method, path), allowed in EXPECTED.items():
        url = _url(path, objects)
        for role in sorted(ALL):
            r = _call(client, method, url, tenant.headers(role))
            if allowed is PERSON:
                assert r.status_code == 401, f"{role} key let into {method} {path}"
                assert r.json()["error"]["code"] == "signin_required"
            elif allowed is ORIGIN:
                assert r.status_code == 403, f"{role} {method} {path} without an Origin"
                assert r.json()["error"]["code"] == "origin_forbidden"
            elif role in allowed or allowed is PUBLIC:
                assert r.status_code != 403, f"{role} refused on {method} {path}: {r.text}"
                assert r.status_code < 500, f"{role} {method} {path}: {r.status_code} {r.text}"
            else:
                assert r.status_code == 403, f"{role} let into {method} {path}: {r.status_code}"
                assert r.json()["error"]["code"] == "forbidden"
        if allowed is not PUBLIC and allowed is not ORIGIN:
            r = _call(client, method, url, {})
            assert r.status_code == 401, f"no key let into {method} {path}"


def test_other_tenant_gets_404_for_every_object(client: TestClient, tenant: TenantKeys,
                                                other_tenant: TenantKeys,
                                                objects: dict[str, str]) -> None:
    checked = 0
    for (method, path), allowed in EXPECTED.items():
        if "{" not in path:
            continue
        url = _url(path, objects)
        for role in sorted(allowed):
            r = _call(client, method, url, other_tenant.headers(role))
            assert r.status_code == 404, f"B's {role} on A's {method} {path}: {r.status_code}"
            assert r.json()["error"]["code"] == "not_found"
            # indistinguishable from an id that does not exist
            missing = _url(path, {k: v[:-4] + "0000" for k, v in objects.items()})
            r2 = _call(client, method, missing, other_tenant.headers(role))
            assert r2.status_code == 404 and r2.json() == r.json(), f"{method} {path}"
            checked += 1
    assert checked >= 10
    # and A's objects are untouched: the approval is still pending for A
    r = client.get(f"/v1/approvals/{objects['approval_id']}", headers=tenant.headers("approver"))
    assert r.status_code == 200 and r.json()["state"] == "pending"
