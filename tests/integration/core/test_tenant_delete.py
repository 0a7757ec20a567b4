from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from sandboxsec.audit.events import AuditEvent
from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_session


def _events(services: Services, tenant_id: str) -> list[str]:
    from sqlmodel import select

    from sandboxsec.audit.models import AuditEntryRow

    with services.db.session() as s:
        rows = s.exec(select(AuditEntryRow).where(AuditEntryRow.tenant_id == tenant_id)).all()
    return [r.event for r in rows]


def test_delete_tenant_shreds_data_and_revokes_keys(client: TestClient, services: Services,
                                                    tenant: TenantKeys,
                                                    other_tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    data = base64.b64encode(b"screenshot of the bank app").decode()
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "screenshot", "data": data, "meta": {}})
    assert r.status_code in (200, 201), r.text
    record_id = r.json()["record_id"]
    assert client.get(f"/v1/sessions/{sid}/trajectory/{record_id}",
                      headers=tenant.headers("admin")).status_code == 200

    # refused without the confirming name
    r = client.request("DELETE", "/v1/tenant", headers=tenant.headers("admin"),
                       json={"confirm_name": "someone-else"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "tenant_confirmation_mismatch"
    # only an admin may delete
    r = client.request("DELETE", "/v1/tenant", headers=tenant.headers("agent"),
                       json={"confirm_name": tenant.name})
    assert r.status_code == 403

    r = client.request("DELETE", "/v1/tenant", headers=tenant.headers("admin"),
                       json={"confirm_name": tenant.name})
    assert r.status_code == 200, r.text
    assert r.json()["keks_destroyed"] >= 1 and r.json()["keys_revoked"] == 4

    for role in ("admin", "agent", "approver", "auditor"):
        assert client.get("/v1/tenant", headers=tenant.headers(role)).status_code == 401
    # The data is unreadable even to the service itself: its keys are gone.
    from sandboxsec.errors import SandboxSecError
    from sandboxsec.principal import Principal, Role

    admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
    with pytest.raises(SandboxSecError):
        services.trajectory.read(admin, sid, record_id)
    events = _events(services, tenant.id)
    assert str(AuditEvent.KEY_SHRED) in events and str(AuditEvent.TENANT_DELETE) in events
    # the other tenant is untouched
    assert client.get("/v1/tenant", headers=other_tenant.headers("admin")).status_code == 200
