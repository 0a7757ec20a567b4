"""``sandboxsec_audit_checkpoint_age_seconds``: how long appended entries have waited for a
checkpoint.  It grows only while a log has entries no checkpoint covers; a log whose every
entry is covered does not age, however long ago its checkpoint was (quiet tenants must not
page anyone)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import select

from sandboxsec.api.app import create_app
from sandboxsec.audit.models import AuditHeadRow
from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_tenant
from tests.integration.audit.conftest import decision


def _age(client: TestClient) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "sandboxsec_audit_checkpoint_age_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no checkpoint age gauge")


def _checkpoint_every_log(services: Services) -> None:
    with services.db.session() as s:
        logs = [r.id for r in s.exec(select(AuditHeadRow)).all()]
    for log_id in logs:
        services.audit.checkpoint_now(log_id)


def test_age_counts_only_entries_waiting_for_a_checkpoint(services: Services) -> None:
    tenant: TenantKeys = make_tenant(services, "bank-a")
    with TestClient(create_app(services)) as client:
        _checkpoint_every_log(services)
        # 1. Everything covered: 0, although the (fixed) clock's checkpoints are days old.
        assert _age(client) == 0.0
        # 2. New entries and no checkpoint yet: they have waited since the last one.
        services.audit.append_many([decision(tenant.id, i) for i in range(3)])
        assert _age(client) > 24 * 3600
        # 3. Covered again: back to 0.
        _checkpoint_every_log(services)
        assert _age(client) == 0.0
