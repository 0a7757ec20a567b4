"""Fixtures for audit-log integration tests: services with frequent checkpoints, raw SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import AuditWitness, Settings
from sandboxsec.storage.db import Database
from tests.integration.audit.witnesses import WitnessProcess, witnesses

CHECKPOINT_EVERY = 8


@pytest.fixture
def audit_services(
    settings: Settings, database: Database, clock: FixedClock
) -> Iterator[Services]:
    """Services (both backends) that sign a checkpoint every few entries."""
    s = settings.model_copy(
        update={"audit_checkpoint_every": CHECKPOINT_EVERY, "audit_write_timeout_seconds": 10.0}
    )
    svc = Services(s, clock=clock, db=database)
    yield svc
    svc.close()


@pytest.fixture
def witnessed(
    settings: Settings, database: Database, clock: FixedClock, tmp_path: Path
) -> Iterator[tuple[Services, list[WitnessProcess]]]:
    """Services (both backends) whose checkpoints go to two witness processes."""
    log_vkey = Services(settings, clock=clock, db=database).audit.keys.verifier_key()
    with witnesses(tmp_path, log_vkey) as ws:
        s = settings.model_copy(update={
            "audit_checkpoint_every": CHECKPOINT_EVERY,
            "audit_write_timeout_seconds": 10.0,
            "audit_witnesses": [AuditWitness(url=w.url, key=w.vkey) for w in ws],
        })
        svc = Services(s, clock=clock, db=database)
        try:
            yield svc, ws
        finally:
            svc.close()


def decision(tenant_id: str | None, i: int, **kw: Any) -> AuditRecord:
    """A policy decision record with a secret in it."""
    fields: dict[str, Any] = dict(
        event=AuditEvent.POLICY_DECISION,
        tenant_id=tenant_id,
        actor_key_id="ak_test",
        actor_role="agent",
        outcome="allow",
        reason="rule_allow_small",
        object_ids={"session_id": f"ss_{i}"},
        body={"i": i, "action": "payment"},
        sensitive={"card": "4111111111111111"},
    )
    fields.update(kw)
    return AuditRecord(**fields)


def sql(services: Services, statement: str, **params: Any) -> None:
    """Run one statement directly against the database, behind the service's back."""
    with services.db.engine.begin() as conn:
        conn.execute(text(statement), params)
