from __future__ import annotations

from fastapi.testclient import TestClient

from sandboxsec.services import Services
from tests.conftest import TenantKeys


def _code(resp) -> str:  # type: ignore[no-untyped-def]
    return str(resp.json()["error"]["code"])


def test_each_role_key_authenticates_to_its_own_tenant(
    client: TestClient, tenant: TenantKeys
) -> None:
    for role in ("admin", "agent", "approver", "auditor"):
        r = client.get("/v1/tenant", headers=tenant.headers(role))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body == {
            "tenant_id": tenant.id,
            "tenant_name": tenant.name,
            "key_id": tenant.key_ids[role],
            "role": role,
        }


def test_missing_malformed_and_unknown_keys_are_401(client: TestClient) -> None:
    assert _code(client.get("/v1/tenant")) == "api_key_invalid"
    for header in (
        "Bearer",
        "Basic abc",
        "Bearer ssk_nope",
        "Bearer ssk_0123456789abcdef_" + "a" * 43,
    ):
        r = client.get("/v1/tenant", headers={"Authorization": header})
        assert r.status_code == 401 and _code(r) == "api_key_invalid"


def test_tampered_secret_is_refused(client: TestClient, tenant: TenantKeys) -> None:
    key = tenant.keys["admin"]
    bad = key[:-1] + ("A" if key[-1] != "A" else "B")
    r = client.get("/v1/tenant", headers={"Authorization": f"Bearer {bad}"})
    assert r.status_code == 401


def test_role_without_permission_is_403(client: TestClient, tenant: TenantKeys) -> None:
    for role in ("agent", "approver", "auditor"):
        r = client.post("/v1/api-keys", json={"role": "agent"}, headers=tenant.headers(role))
        assert r.status_code == 403 and _code(r) == "forbidden"


def test_admin_issues_and_revokes_keys(
    client: TestClient, tenant: TenantKeys, services: Services
) -> None:
    r = client.post(
        "/v1/api-keys", json={"role": "approver", "label": "alice"}, headers=tenant.headers("admin")
    )
    assert r.status_code == 201, r.text
    new = r.json()
    h = {"Authorization": f"Bearer {new['key']}"}
    assert client.get("/v1/tenant", headers=h).json()["role"] == "approver"
    listed = client.get("/v1/api-keys", headers=tenant.headers("admin")).json()
    assert new["key_id"] in {k["key_id"] for k in listed}
    assert all("key" not in k for k in listed)
    assert (
        client.delete(f"/v1/api-keys/{new['key_id']}", headers=tenant.headers("admin")).status_code
        == 204
    )
    r = client.get("/v1/tenant", headers=h)
    assert r.status_code == 401 and _code(r) == "api_key_invalid"


def test_other_tenants_key_is_404_like_a_missing_one(
    client: TestClient, tenant: TenantKeys, other_tenant: TenantKeys
) -> None:
    theirs = other_tenant.key_ids["agent"]
    r1 = client.delete(f"/v1/api-keys/{theirs}", headers=tenant.headers("admin"))
    r2 = client.delete("/v1/api-keys/0000000000000000", headers=tenant.headers("admin"))
    assert r1.status_code == r2.status_code == 404
    assert r1.json() == r2.json()
    # and their key still works
    assert client.get("/v1/tenant", headers=other_tenant.headers("agent")).status_code == 200


def test_bad_input_gets_reason_codes_not_500(client: TestClient, tenant: TenantKeys) -> None:
    h = tenant.headers("admin")
    r = client.post("/v1/api-keys", json={"role": "root"}, headers=h)
    assert r.status_code == 400 and _code(r) == "invalid_input"
    r = client.post(
        "/v1/api-keys", content=b"{not json", headers={**h, "content-type": "application/json"}
    )
    assert r.status_code == 400 and _code(r) == "invalid_input"
    deep = b"[" * 5000 + b"]" * 5000
    r = client.post("/v1/api-keys", content=deep, headers={**h, "content-type": "application/json"})
    assert r.status_code == 400 and _code(r) == "json_too_deep"
    huge = b'{"role": "agent", "label": "' + b"x" * (17 * 1024 * 1024) + b'"}'
    r = client.post("/v1/api-keys", content=huge, headers={**h, "content-type": "application/json"})
    assert r.status_code == 413 and _code(r) == "payload_too_large"
    r = client.get("/v1/no-such-route", headers=h)
    assert r.status_code == 404 and _code(r) == "not_found"
    r = client.put("/v1/tenant", headers=h)
    assert r.status_code == 405 and _code(r) == "method_not_allowed"


def test_duplicate_tenant_name_is_a_conflict(services: Services, tenant: TenantKeys) -> None:
    import pytest

    from sandboxsec.tenants.errors import TenantNameTakenError

    with pytest.raises(TenantNameTakenError):
        services.tenants.create(tenant.name)


def test_health_and_metrics(client: TestClient, tenant: TenantKeys) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["database"] == "ok"
    client.get("/v1/tenant", headers=tenant.headers("agent"))
    m = client.get("/metrics")
    assert m.status_code == 200
    assert 'sandboxsec_http_requests_total{method="GET",route="/v1/tenant",status="200"}' in m.text
    assert client.get("/openapi.json").json()["info"]["title"] == "sandboxsec"
    assert "x-request-id" in r.headers
