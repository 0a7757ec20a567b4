"""The trajectory and key HTTP API: roles, tenant isolation, reason codes."""

from __future__ import annotations

import base64
import os

from fastapi.testclient import TestClient

from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.crypto.test_trajectory import MakeSession


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _code(resp: object) -> str:
    return str(resp.json()["error"]["code"])  # type: ignore[attr-defined]


def test_write_then_admin_reads(client: TestClient, services: Services, tenant: TenantKeys,
                                make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    shot = os.urandom(9000)
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "action", "data": _b64(b"open payments"),
                          "meta": {"url": "https://bank.example/pay"}})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["size"] == 13 and len(first["content_sha256"]) == 64
    services.clock.advance(1)  # type: ignore[attr-defined]
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "screenshot", "data": _b64(shot)})
    second = r.json()["record_id"]

    r = client.get(f"/v1/sessions/{sid}/trajectory/{first['record_id']}",
                   headers=tenant.headers("admin"))
    assert r.status_code == 200
    body = r.json()
    assert base64.b64decode(body["data"]) == b"open payments"
    assert body["meta"] == {"url": "https://bank.example/pay"}
    assert body["created_by"] == tenant.key_ids["agent"]
    r = client.get(f"/v1/sessions/{sid}/trajectory/{second}/data",
                   headers=tenant.headers("admin"))
    assert r.status_code == 200 and r.content == shot
    assert r.headers["content-type"] == "application/octet-stream"
    r = client.get(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("admin"),
                   params={"limit": 1})
    page = r.json()
    assert len(page["records"]) == 1 and page["next_after"] is not None
    r = client.get(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("admin"),
                   params={"after": page["next_after"]})
    assert [x["record_id"] for x in r.json()["records"]] == [second]
    r = client.get(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("admin"),
                   params={"kind": "action"})
    assert [x["record_id"] for x in r.json()["records"]] == [first["record_id"]]


def test_roles_and_tenants(client: TestClient, tenant: TenantKeys, other_tenant: TenantKeys,
                          make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "action", "data": _b64(b"x")})
    rid = r.json()["record_id"]
    url = f"/v1/sessions/{sid}/trajectory/{rid}"
    for role in ("agent", "approver", "auditor"):
        r = client.get(url, headers=tenant.headers(role))
        assert r.status_code == 403 and _code(r) == "forbidden"
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("admin"),
                    json={"kind": "action", "data": _b64(b"x")})
    assert r.status_code == 403
    # Another tenant: the same 404 as an id that does not exist.
    for path in (url, f"{url}/data", f"/v1/sessions/{sid}/trajectory",
                 f"/v1/sessions/{sid}/trajectory/tr_missing"):
        r = client.get(path, headers=other_tenant.headers("admin"))
        assert r.status_code == 404 and _code(r) == "not_found", path
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=other_tenant.headers("agent"),
                    json={"kind": "action", "data": _b64(b"x")})
    assert r.status_code == 404 and _code(r) == "not_found"


def test_refusals(client: TestClient, services: Services, tenant: TenantKeys,
                  make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    url = f"/v1/sessions/{sid}/trajectory"
    too_big = b"\x00" * (services.settings.max_record_bytes + 1)
    r = client.post(url, headers=tenant.headers("agent"),
                    json={"kind": "screenshot", "data": _b64(too_big)})
    assert r.status_code == 413 and _code(r) == "trajectory_record_too_large"
    r = client.post(url, headers=tenant.headers("agent"), json={"kind": "action", "data": "!!"})
    assert r.status_code == 400 and _code(r) == "invalid_input"
    r = client.post(url, headers=tenant.headers("agent"), json={"kind": "BAD", "data": ""})
    assert r.status_code == 400
    r = client.get(url, headers=tenant.headers("admin"))
    assert r.json()["records"] == []


def test_tampered_record_is_422(client: TestClient, services: Services, tenant: TenantKeys,
                                make_session: MakeSession) -> None:
    from sqlalchemy import update

    from sandboxsec.trajectory.models import TrajectoryRecord

    sid = make_session(tenant.id)
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "action", "data": _b64(b"pay 10")})
    rid = r.json()["record_id"]
    with services.db.session() as s:
        row = s.get(TrajectoryRecord, rid)
        assert row is not None
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == rid)  # type: ignore[arg-type]
               .values(data=row.data[:-1] + bytes([row.data[-1] ^ 1])))
    r = client.get(f"/v1/sessions/{sid}/trajectory/{rid}", headers=tenant.headers("admin"))
    assert r.status_code == 422 and _code(r) == "decryption_failed"
    assert "pay" not in r.text


def test_key_management_api(client: TestClient, tenant: TenantKeys,
                            make_session: MakeSession) -> None:
    admin = tenant.headers("admin")
    r = client.get("/v1/keys", headers=admin)
    assert r.status_code == 200 and r.json()["current_version"] == 0
    sid = make_session(tenant.id)
    client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                json={"kind": "action", "data": _b64(b"v1")})
    r = client.post("/v1/keys/rotate", headers=admin, json={})
    assert r.status_code == 200 and r.json()["current_version"] == 2
    r = client.post("/v1/keys/rewrap", headers=admin)
    assert r.json() == {"version": 2, "rewrapped": 1, "skipped_retired": 0}
    r = client.post("/v1/keys/retire", headers=admin, json={"min_decryption_version": 5})
    assert r.status_code == 400 and _code(r) == "key_version_invalid"
    r = client.post("/v1/keys/retire", headers=admin, json={"min_decryption_version": 2})
    assert r.status_code == 200 and r.json()["min_decryption_version"] == 2
    r = client.post("/v1/keys/rotate", headers=admin, json={"rewrap": True})
    body = r.json()
    assert body["current_version"] == 3
    assert [(v["version"], v["data_keys"]) for v in body["versions"]] == [(1, 0), (2, 0), (3, 1)]
    for role in ("agent", "approver", "auditor"):
        assert client.post("/v1/keys/rotate", headers=tenant.headers(role),
                           json={}).status_code == 403
