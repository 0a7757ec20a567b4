"""The audit trail outlives tenants; operator actions and refused keys reach the service log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.models import AuditEntryRow
from sandboxsec.audit.record import SERVICE_LOG
from sandboxsec.cli import main
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys
from tests.support.cli import cli_json, cli_jsons


def _entries(services: Services, log_id: str, event: AuditEvent) -> list[dict[str, object]]:
    with services.db.session() as s:
        rows = s.exec(select(AuditEntryRow).where(AuditEntryRow.tenant_id == log_id,
                                                  AuditEntryRow.event == str(event))
                      .order_by(AuditEntryRow.seq)).all()  # type: ignore[arg-type]
    return [json.loads(r.entry) for r in rows]


def test_deleted_tenants_log_is_exported_and_verified_by_the_operator(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Operator commands never create a database: it is made on purpose first.
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["tenant", "create", "bank-gone"]) == 0
    tenant_id = cli_json(capsys.readouterr().out)["tenant_id"]
    assert main(["keys", "rotate", "--tenant", "bank-gone"]) == 0
    assert main(["tenant", "delete", "bank-gone", "--yes"]) == 0
    deleted = cli_jsons(capsys.readouterr().out)[-1]
    assert deleted["tenant_key_destroyed"] is True
    export = tmp_path / "gone.jsonl"
    # By its former name and by id: the log is still there after the tenant is gone.
    assert main(["audit", "export", "--tenant", "bank-gone", "-o", str(export)]) == 0
    assert main(["audit", "export", "--tenant", tenant_id, "-o", str(export)]) == 0
    assert main(["audit", "public-key"]) == 0
    pub = tmp_path / "audit.pub"
    pub.write_text(capsys.readouterr().out)
    assert main(["audit", "verify", str(export), "--public-key", str(pub)]) == 0
    events = [json.loads(line).get("event") for line in export.read_text().splitlines()]
    assert str(AuditEvent.TENANT_DELETE) in events and str(AuditEvent.KEY_SHRED) in events
    # Live commands still refuse a deleted tenant.
    assert main(["keys", "status", "--tenant", tenant_id]) == 2

    # The service log has the lifecycle and every operator command, with its outcome.
    service_export = tmp_path / "service.jsonl"
    assert main(["audit", "export", "--service", "-o", str(service_export)]) == 0
    lines = [json.loads(x) for x in service_export.read_text().splitlines()]
    entries = [x for x in lines if "event" in x]
    assert {str(AuditEvent.TENANT_CREATE), str(AuditEvent.TENANT_DELETE)} <= {
        e["event"] for e in entries}
    runs = [(e["body"]["command"], e["outcome"]) for e in entries
            if e["event"] == str(AuditEvent.OPERATOR_COMMAND)]
    for command in ("tenant create", "keys rotate", "tenant delete", "audit export"):
        assert (command, "started") in runs and (command, "success") in runs, command
    assert ("keys status", "started") not in runs  # read-only key status is not recorded
    assert all(e["actor"]["role"] == "operator" for e in entries
               if e["event"] == str(AuditEvent.OPERATOR_COMMAND))
    assert main(["audit", "verify", str(service_export), "--public-key", str(pub)]) == 0


def test_a_failed_operator_command_is_recorded_with_its_reason(
    settings: Settings, capsys: pytest.CaptureFixture[str],
) -> None:
    # Operator commands never create a database: it is made on purpose first.
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate", "--tenant", "nobody"]) == 2
    svc = Services(settings)
    try:
        runs = [(e["outcome"], e["reason"]) for e in _entries(svc, SERVICE_LOG,
                                                              AuditEvent.OPERATOR_COMMAND)]
    finally:
        svc.close()
    assert runs == [("started", None), ("failure", "not_found")]


@pytest.fixture
def limited(settings: Settings, database: Database, clock: FixedClock) -> Iterator[Services]:
    s = settings.model_copy(update={"auth_failure_audit_per_window": 3,
                                    "auth_failure_audit_window_seconds": 60.0})
    svc = Services(s, clock=clock, db=database)
    yield svc
    svc.close()


def test_refused_keys_are_audited_and_a_flood_is_bounded(
    limited: Services, clock: FixedClock,
) -> None:
    from sandboxsec.api.app import create_app
    from tests.conftest import make_tenant

    tenant: TenantKeys = make_tenant(limited, "bank-a")
    admin_key = tenant.keys["admin"]
    key_id = tenant.key_ids["admin"]
    # The admin key's id with a wrong secret.
    wrong = f"ssk_{key_id}_" + "x" * 43
    assert wrong != admin_key
    with TestClient(create_app(limited), raise_server_exceptions=False) as client:
        assert client.get("/v1/tenant", headers={"Authorization": f"Bearer {wrong}"}
                          ).status_code == 401
        for i in range(20):
            r = client.get("/v1/tenant", headers={"Authorization": f"Bearer ssk_bad{i}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "api_key_invalid"
        entries = _entries(limited, SERVICE_LOG, AuditEvent.AUTH_FAILURE)
        # The flood wrote three entries, not twenty-one.
        assert len(entries) == 3
        first = entries[0]
        assert first["outcome"] == "refused" and first["reason"] == "api_key_invalid"
        assert first["body"] == {"why": "wrong_secret", "suppressed": 0, "key_id": key_id,
                                 "key_tenant_id": tenant.id}
        assert "remote_addr" in first["hmac"]
        assert entries[1]["body"]["why"] == "malformed"
        text = json.dumps(entries)
        assert "x" * 43 not in text and "ssk_bad" not in text
        # The next window itemises again and reports what it did not write.
        clock.advance(61)
        client.get("/v1/tenant", headers={"Authorization": f"Bearer {wrong}"})
        entries = _entries(limited, SERVICE_LOG, AuditEvent.AUTH_FAILURE)
        assert len(entries) == 4 and entries[-1]["body"]["suppressed"] == 18
        # A revoked key and a deleted tenant's key are told apart in the log, not to the
        # caller.
        limited.tenants.delete(tenant.id, actor=None)
        r = client.get("/v1/tenant", headers=tenant.headers("agent"))
        assert r.status_code == 401
        last = _entries(limited, SERVICE_LOG, AuditEvent.AUTH_FAILURE)[-1]
        assert last["body"]["why"] == "revoked"
        # Nothing was written to the tenant's own log by outsiders.
        assert _entries(limited, tenant.id, AuditEvent.AUTH_FAILURE) == []
