"""Fixtures for audit-log integration tests: services with frequent checkpoints, raw SQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.merkle import Frontier
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


def truncate_log(svc: Services, log_id: str, keep: int) -> None:
    """What a database administrator can do: drop the entries from ``keep`` on and roll the
    log's head and checkpoints back to a size the service never signed."""
    with svc.db.engine.begin() as conn:
        rows = conn.execute(text(
            "SELECT leaf_hash FROM audit_entries WHERE tenant_id = :t ORDER BY seq"
        ), {"t": log_id}).all()
        leaves = [bytes(r[0]) for r in rows][:keep]
        conn.execute(text("DELETE FROM audit_entries WHERE tenant_id = :t AND seq >= :k"),
                     {"t": log_id, "k": keep})
        f = Frontier()
        f.extend(leaves)
        conn.execute(text("UPDATE audit_heads SET size = :k, frontier = :f, last_leaf = :l, "
                          "checkpoint_size = 0 WHERE id = :t"),
                     {"k": keep, "f": f.to_bytes(), "l": leaves[-1], "t": log_id})
        conn.execute(text("DELETE FROM audit_checkpoints WHERE tenant_id = :t AND size > :s"),
                     {"t": log_id, "s": keep - keep % CHECKPOINT_EVERY})
