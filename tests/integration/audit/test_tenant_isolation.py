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
