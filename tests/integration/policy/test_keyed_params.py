"""No plain params hash reaches the audit log, its exports or the grants table.

A plain SHA-256 of canonical params next to the clear amount and currency lets anyone holding
an export test a list of candidate payees.  Only the tenant-keyed ``params_hmac`` is stored;
grants still bind the exact params (the plain hash is in the token the agent holds).
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.audit.models import AuditEntryRow
from sandboxsec.policy.canonical import params_hash
from sandboxsec.policy.models import GrantRecord
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import PAYMENT, ActFn, allow_key_approvals


@pytest.fixture(autouse=True)
def _key_approvals(services: Services, tenant: TenantKeys) -> None:
    """Approver API keys decide here (the machine path)."""
    allow_key_approvals(services, tenant)


def _approve_and_use(client: TestClient, tenant: TenantKeys, act: ActFn) -> str:
    body = act().json()
    aid = body["approval_id"]
    shown = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("approver")).json()
    r = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                    json={"params_hash": shown["params_hash"]})
    assert r.status_code == 200, r.text
    grant = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("agent")).json()["grant"]
    r = client.post("/v1/grants/verify", headers=tenant.headers("agent"),
                    json={"grant": grant, "action": "payment", "params": PAYMENT,
                          "resource": "payee:acme-gmbh"})
    assert r.status_code == 200 and r.json()["valid"] is True, r.text
    # A different payee with the same amount is still refused: the binding holds.
    changed = {**PAYMENT, "payee": "mallory-ltd"}
    r = client.post("/v1/grants/verify", headers=tenant.headers("agent"),
                    json={"grant": grant, "action": "payment", "params": changed})
    assert r.status_code == 422 and r.json()["error"]["code"] == "grant_params_mismatch"
    return aid


def test_audit_and_grants_hold_only_the_keyed_digest(
    client: TestClient, services: Services, tenant: TenantKeys, other_tenant: TenantKeys,
    act: ActFn,
) -> None:
    _approve_and_use(client, tenant, act)
    plain = params_hash(PAYMENT)
    keyed = services.key_hierarchy.params_hmac(tenant.id, plain)
    assert keyed != plain
    assert keyed != services.key_hierarchy.params_hmac(other_tenant.id, plain)
    with services.db.session() as s:
        entries = s.exec(select(AuditEntryRow).where(AuditEntryRow.tenant_id == tenant.id)).all()
        grants = s.exec(select(GrantRecord).where(GrantRecord.tenant_id == tenant.id)).all()
    lines = [e.entry for e in entries]
    assert all(plain not in line for line in lines)
    with_params = [json.loads(x)["body"] for x in lines if "params_hmac" in x]
    assert len(with_params) >= 4  # decision, request, approve, grant issue, grant verify
    assert all(b["params_hmac"] == keyed and "params_hash" not in b for b in with_params)
    assert grants and all(g.params_hash == keyed for g in grants)
    export = client.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert export.status_code == 200 and plain not in export.text and keyed in export.text
