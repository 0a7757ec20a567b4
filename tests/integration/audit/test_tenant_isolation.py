"""On PostgreSQL one tenant's locked audit head delays nobody else.

A transaction outside the service holds a row lock on tenant A's audit head.  Tenant B's
appends (through the shared group commit) and exports must complete at once; A's own append
waits for the lock and completes when it is released.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import text

from sandboxsec.audit.record import AuditReceipt
from sandboxsec.services import Services
from tests.integration.audit.conftest import decision

#: Generous bounds for a loaded 2-core machine; the defect they catch blocks for the full
#: database lock timeout on every append, never for less.
DONE_WITHIN = 4.0


class _Call(threading.Thread):
    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self._fn = fn
        self.result: object = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def pg_services(audit_services: Services) -> Iterator[Services]:
    if not audit_services.db.is_postgres:
        pytest.skip("row locks on audit heads exist on PostgreSQL only (SQLite has one writer)")
    yield audit_services


def test_a_locked_head_of_one_tenant_does_not_delay_another(pg_services: Services) -> None:
    svc = pg_services
    for t in ("tn_a", "tn_b"):
        svc.audit.append(decision(t, 0))
    holder = svc.db.engine.connect()
    trans = holder.begin()
    try:
        holder.execute(text("SELECT * FROM audit_heads WHERE id = 'tn_a' FOR UPDATE"))
        a = _Call(lambda: svc.audit.append(decision("tn_a", 1)))
        a.start()
        b_appends = [_Call(lambda i=i: svc.audit.append(decision("tn_b", i))) for i in range(1, 9)]
        for c in b_appends:
            c.start()
        b_export = _Call(lambda: b"".join(svc.audit.export("tn_b")))
        b_export.start()
        for c in [*b_appends, b_export]:
            c.join(DONE_WITHIN)
            assert not c.is_alive(), "tenant B waited on tenant A's locked head"
            assert c.error is None, c.error
        assert svc.audit.size("tn_b") == 9
        assert b'"tn_b"' in b_export.result  # type: ignore[operator]
        assert a.is_alive(), "tenant A's append cannot have passed the lock"
    finally:
        trans.rollback()
        holder.close()
    a.join(DONE_WITHIN)
    assert not a.is_alive() and a.error is None, a.error
    assert isinstance(a.result, AuditReceipt) and a.result.seq == 1
    # And the sweep that signs due checkpoints skips a busy head instead of stalling.
    holder = svc.db.engine.connect()
    trans = holder.begin()
    try:
        holder.execute(text("SELECT * FROM audit_heads WHERE id = 'tn_a' FOR UPDATE"))
        sweep = _Call(svc.audit.sign_due_checkpoints)
        sweep.start()
        sweep.join(DONE_WITHIN)
        assert not sweep.is_alive() and sweep.error is None
    finally:
        trans.rollback()
        holder.close()


def test_in_transaction_appends_of_other_tenants_pass_a_locked_head(
    pg_services: Services,
) -> None:
    """Deferred sequencing (the PostgreSQL default): no caller's transaction waits for any
    head; tenant B's records are sequenced at once, tenant A's once its head is free."""
    svc = pg_services
    assert svc.audit.writer.deferred
    for t in ("tn_a", "tn_b"):
        svc.audit.append(decision(t, 0))

    def in_tx(tenant: str, i: int) -> None:
        with svc.db.session() as s:
            svc.audit.append(decision(tenant, i), session=s)

    holder = svc.db.engine.connect()
    trans = holder.begin()
    try:
        holder.execute(text("SELECT * FROM audit_heads WHERE id = 'tn_a' FOR UPDATE"))
        a = _Call(lambda: in_tx("tn_a", 1))
        a.start()
        bs = [_Call(lambda i=i: in_tx("tn_b", i)) for i in range(1, 9)]
        for c in bs:
            c.start()
        for c in bs:
            c.join(DONE_WITHIN)
            assert not c.is_alive(), "tenant B waited on tenant A's locked head"
            assert c.error is None, c.error
        assert svc.audit.size("tn_b") == 9
        # A's own transaction committed without the head: its record waits as an intent,
        # and the sweep skips the busy head instead of stalling.
        with svc.db.engine.connect() as c:
            waiting = c.execute(text(
                "SELECT count(*) FROM audit_pending WHERE tenant_id = 'tn_a'")).scalar_one()
        assert waiting == 1
        sweep = _Call(svc.audit.sign_due_checkpoints)
        sweep.start()
        sweep.join(DONE_WITHIN)
        assert not sweep.is_alive() and sweep.error is None
    finally:
        trans.rollback()
        holder.close()
    a.join(DONE_WITHIN)
    assert not a.is_alive() and a.error is None, a.error
    assert [e["body"]["i"] for e in svc.audit.entries("tn_a")] == [0, 1]
