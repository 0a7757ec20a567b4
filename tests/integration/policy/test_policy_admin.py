"""The tenant admin's policy API: read, replace, refuse bad policies, reach every worker."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from sandboxsec.policy.engine import Outcome, bundled_default_policy
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import PAYMENT, ActFn, make_session

ALLOW_SMALL = """\
# payments up to 50 EUR need nobody; above that, ask
p, small, payment, *, amount <= 50 and currency == EUR, allow
p, big, payment, *, amount > 50, approval_required
p, broke, payment, *, amount > 1000, deny
"""


def _code(resp: Any) -> str:
    return str(resp.json()["error"]["code"])


def test_default_policy_is_version_zero(client: TestClient, tenant: TenantKeys) -> None:
    r = client.get("/v1/policy", headers=tenant.headers("admin"))
    assert r.status_code == 200
    assert r.json()["version"] == 0 and r.json()["is_default"] is True
    assert r.json()["text"] == bundled_default_policy()


def test_replace_policy_takes_effect(client: TestClient, tenant: TenantKeys,
                                     other_tenant: TenantKeys, act: ActFn) -> None:
    r = client.put("/v1/policy", json={"text": ALLOW_SMALL}, headers=tenant.headers("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.json()["rule_count"] == 3
    small = act(params={**PAYMENT, "amount": "50.00"})
    assert small.json()["decision"] == "allow" and small.json()["rule_id"] == "small"
    assert small.json()["policy_version"] == 1
    assert act(params={**PAYMENT, "amount": "50.01"}).json()["decision"] == "approval_required"
    assert act(params={**PAYMENT, "amount": "1000.01"}).json()["rule_id"] == "broke"
    # The other tenant still runs the default.
    assert client.get("/v1/policy", headers=other_tenant.headers("admin")).json()["version"] == 0


def test_each_tenant_decides_under_its_own_version(client: TestClient, tenant: TenantKeys,
                                                  other_tenant: TenantKeys, act: ActFn,
                                                  services: Services) -> None:
    # The version in force is read with the session in one statement: it must be the acting
    # tenant's, whichever tenant changed its policy last.
    other_sid = make_session(services, other_tenant)
    for text in (ALLOW_SMALL, ALLOW_SMALL + "p, tiny, payment, *, amount <= 1, allow\n"):
        assert client.put("/v1/policy", json={"text": text},
                          headers=tenant.headers("admin")).status_code == 200
    small = {**PAYMENT, "amount": "50.00"}
    mine = act(params=small)
    assert mine.json()["policy_version"] == 2 and mine.json()["rule_id"] == "small"
    theirs = act(params=small, sid=other_sid, who=other_tenant)
    assert theirs.status_code == 200, theirs.text
    assert theirs.json()["policy_version"] == 0
    # The other tenant's session is not found for this tenant's agent, and the reverse.
    assert act(params=small, sid=other_sid).status_code == 404
    assert act(params=small, who=other_tenant).status_code == 404


def test_malformed_policy_refused_old_one_kept(client: TestClient, tenant: TenantKeys,
                                               act: ActFn, services: Services) -> None:
    assert client.put("/v1/policy", json={"text": ALLOW_SMALL},
                      headers=tenant.headers("admin")).status_code == 200
    bad = ALLOW_SMALL + "p, worse, payment, *, amount > lots, deny\n"
    r = client.put("/v1/policy", json={"text": bad}, headers=tenant.headers("admin"))
    assert r.status_code == 400 and _code(r) == "policy_invalid"
    assert "line 5" in r.json()["error"]["message"]
    current = client.get("/v1/policy", headers=tenant.headers("admin")).json()
    assert current["version"] == 1 and current["text"] == ALLOW_SMALL
    assert act(params={**PAYMENT, "amount": "10"}).json()["decision"] == "allow"
    rejects = services.audit.entries(tenant.id, event="policy:rules:reject")
    assert rejects and rejects[-1]["reason"] == "policy_invalid"


def test_validate_without_installing(client: TestClient, tenant: TenantKeys) -> None:
    r = client.post("/v1/policy/validate", json={"text": ALLOW_SMALL},
                    headers=tenant.headers("admin"))
    assert r.status_code == 200 and r.json()["rule_count"] == 3
    r = client.post("/v1/policy/validate", json={"text": "p, x\n"},
                    headers=tenant.headers("admin"))
    assert r.status_code == 400 and "line 1" in r.json()["error"]["message"]
    assert client.get("/v1/policy", headers=tenant.headers("admin")).json()["version"] == 0


def test_only_admins_manage_policy(client: TestClient, tenant: TenantKeys) -> None:
    for role in ("agent", "approver", "auditor"):
        r = client.put("/v1/policy", json={"text": ALLOW_SMALL}, headers=tenant.headers(role))
        assert r.status_code == 403 and _code(r) == "forbidden"
        assert client.get("/v1/policy", headers=tenant.headers(role)).status_code == 403


def test_stale_base_version_refused(client: TestClient, tenant: TenantKeys) -> None:
    h = tenant.headers("admin")
    assert client.put("/v1/policy", json={"text": ALLOW_SMALL, "base_version": 0},
                      headers=h).status_code == 200
    r = client.put("/v1/policy", json={"text": bundled_default_policy(), "base_version": 0},
                   headers=h)
    assert r.status_code == 409 and _code(r) == "policy_version_conflict"
    assert client.put("/v1/policy", json={"text": bundled_default_policy(), "base_version": 1},
                      headers=h).json()["version"] == 2


def test_change_reaches_another_worker(services: Services, tenant: TenantKeys,
                                       session_id: str) -> None:
    # A second Services on the same database stands in for another worker process: it has
    # its own engine cache, warmed on the old version.
    other = Services(services.settings, clock=services.clock, db=services.db)
    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
    params = {**PAYMENT, "amount": "20.00"}

    def decide(svc: Services) -> Outcome:
        return svc.policy.request_action(agent, session_id=session_id, action="payment",
                                         resource="payee:acme-gmbh",
                                         params=params).decision.outcome

    try:
        assert decide(other) is Outcome.APPROVAL_REQUIRED
        services.policy.replace_policy(admin, ALLOW_SMALL)
        assert decide(other) is Outcome.ALLOW
    finally:
        other.close(keep_db=True)  # its audit writer thread too, not the shared database
