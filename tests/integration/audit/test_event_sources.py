"""Each source of audit events records its action in the tenant's log, and the log verifies.

One test per source, through the real services (the deeper flows — affirming attestations,
approvals, trajectory reads — are covered by their domains' tests, which read the same log).
"""

from __future__ import annotations

import pytest

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.verify import verify_export
from sandboxsec.errors import SandboxSecError
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys


def _events(services: Services, log_id: str) -> list[str]:
    return [e["event"] for e in services.audit.entries(log_id)]


def _verifies(services: Services, log_id: str) -> None:
    data = b"".join(services.audit.export(log_id))
    verify_export(data, services.audit.keys.public_key, expected_log=log_id)


def _who(tenant: TenantKeys, role: Role) -> Principal:
    return Principal(tenant_id=tenant.id, key_id=tenant.key_ids[str(role)], role=role)


def test_tenant_and_api_key_changes(services: Services, tenant: TenantKeys) -> None:
    admin = _who(tenant, Role.ADMIN)
    issued = services.tenants.create_key(tenant.id, Role.AGENT, actor=admin, label="ci")
    services.tenants.revoke_key(tenant.id, issued.key_id, actor=admin)
    events = _events(services, tenant.id)
    assert events[0] == AuditEvent.TENANT_CREATE
    assert events[-2:] == [AuditEvent.APIKEY_CREATE, AuditEvent.APIKEY_REVOKE]
    revoke = services.audit.entries(tenant.id)[-1]
    assert revoke["actor"] == {"key_id": admin.key_id, "role": "admin"}
    assert revoke["object_ids"] == {"key_id": issued.key_id}
    _verifies(services, tenant.id)


def test_attestation_challenges_write_nothing(services: Services, tenant: TenantKeys) -> None:
    # A nonce is stateless: issuing one changes nothing, so nothing is audited; the verdict
    # that consumes it records it (tests/integration/attestation/test_lean_nonce.py).
    before = services.audit.entries(tenant.id)
    services.attestation.issue_nonce(_who(tenant, Role.AGENT))
    assert services.audit.entries(tenant.id) == before
    assert AuditEvent.ATTESTATION_CHALLENGE not in _events(services, tenant.id)
    _verifies(services, tenant.id)


def test_refused_sessions(services: Services, tenant: TenantKeys) -> None:
    with pytest.raises(SandboxSecError):
        services.sessions.start(_who(tenant, Role.AGENT), "")
    refusal = services.audit.entries(tenant.id, event=AuditEvent.SESSION_REFUSE)
    assert len(refusal) == 1 and refusal[0]["reason"]
    _verifies(services, tenant.id)


def test_key_rotation(services: Services, tenant: TenantKeys) -> None:
    services.key_admin.rotate(tenant.id, _who(tenant, Role.ADMIN))
    assert AuditEvent.KEY_ROTATE in _events(services, tenant.id)
    _verifies(services, tenant.id)


def test_refused_grants(services: Services, tenant: TenantKeys) -> None:
    with pytest.raises(SandboxSecError):
        services.policy.verify_grant(
            _who(tenant, Role.AGENT), token="not-a-grant", action="payment", params={}
        )
    rejected = services.audit.entries(tenant.id, event=AuditEvent.GRANT_REJECT)
    assert len(rejected) == 1 and rejected[0]["reason"]
    _verifies(services, tenant.id)


def _live_session(services: Services, tenant: TenantKeys) -> str:
    """A session row as the sessions domain stores it after an affirming attestation."""
    from datetime import timedelta

    from sandboxsec.ids import new_id
    from sandboxsec.sessions.models import AgentSession

    now = services.clock.now()
    sid = new_id("ses")
    with services.db.session() as s:
        s.add(AgentSession(id=sid, tenant_id=tenant.id, attested=True,
                           created_by=tenant.key_ids["agent"], created_at=now,
                           expires_at=now + timedelta(hours=1)))
    return sid


def test_policy_decisions(services: Services, tenant: TenantKeys) -> None:
    sid = _live_session(services, tenant)
    services.policy.request_action(
        _who(tenant, Role.AGENT), session_id=sid, action="payment", resource="payee:acme",
        params={"amount": "12.00", "currency": "EUR", "card": "4111111111111111"},
    )
    decisions = services.audit.entries(tenant.id, event=AuditEvent.POLICY_DECISION)
    assert len(decisions) == 1
    assert decisions[0]["object_ids"].get("session_id") == sid
    assert "4111111111111111" not in json_text(services, tenant.id)
    _verifies(services, tenant.id)


def test_trajectory_writes_and_reads(services: Services, tenant: TenantKeys) -> None:
    sid = _live_session(services, tenant)
    stored = services.trajectory.write(_who(tenant, Role.AGENT), sid, "screenshot", b"pixels")
    services.trajectory.read(_who(tenant, Role.ADMIN), sid, stored.record_id)
    events = _events(services, tenant.id)
    assert AuditEvent.TRAJECTORY_WRITE in events and AuditEvent.TRAJECTORY_READ in events
    assert events.index(AuditEvent.TRAJECTORY_WRITE) < events.index(AuditEvent.TRAJECTORY_READ)
    _verifies(services, tenant.id)


def json_text(services: Services, log_id: str) -> str:
    return b"".join(services.audit.export(log_id)).decode()
