"""Deferred sequencing: appends in a caller's transaction leave intents, sequenced in batches.

Runs on SQLite and PostgreSQL with deferred sequencing forced on (it is the default on
PostgreSQL only).  What must hold: an intent commits or rolls back with its caller; no caller
waits for a log's head; every committed intent reaches the log exactly once, in order, even
when its process dies before sequencing it; several nodes give one total order that verifies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from sandboxsec.audit.errors import AuditLogAlarmedError, AuditUnavailableError
from sandboxsec.audit.verify import verify_export
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.integration.audit.conftest import CHECKPOINT_EVERY, decision

LOG = "tn_deferred"


def _settings(settings: Settings) -> Settings:
    return settings.model_copy(update={
        "audit_checkpoint_every": CHECKPOINT_EVERY, "audit_write_timeout_seconds": 10.0,
        "audit_deferred_sequencing": True,
    })


@pytest.fixture
def node(settings: Settings, database: Database, clock: FixedClock) -> Iterator[Services]:
    svc = Services(_settings(settings), clock=clock, db=database)
    yield svc
    svc.close()


def _count(db: Database, table: str) -> int:
    with db.engine.connect() as c:
        return int(c.execute(text(f"SELECT count(*) FROM {table} WHERE tenant_id = :t"),
                             {"t": LOG}).scalar_one())


def _export(svc: Services) -> bytes:
    return b"".join(svc.audit.export(LOG))


def test_an_intent_commits_with_its_caller_and_is_sequenced_after(node: Services) -> None:
    log = node.audit
    assert log.writer.deferred
    with node.db.session() as s:
        r = log.append(decision(LOG, 0), session=s)
        assert (r.log_id, r.seq, r.pending) == (LOG, -1, True)
        # Inside the transaction: an intent, no entry, no head touched.
        assert s.connection().execute(
            text("SELECT count(*) FROM audit_pending WHERE tenant_id = :t"), {"t": LOG}
        ).scalar_one() == 1
        assert _count(node.db, "audit_heads") == 0
    # After the commit the caller's own sequencing step ran: in the log, no intent left.
    assert _count(node.db, "audit_entries") == 1 and _count(node.db, "audit_pending") == 0
    with pytest.raises(RuntimeError), node.db.session() as s:
        log.append(decision(LOG, 1), session=s)
        raise RuntimeError("the action failed after it was audited")
    assert _count(node.db, "audit_pending") == 0
    assert [e["body"]["i"] for e in log.entries(LOG)] == [0]
    report = verify_export(_export(node), log.keys.public_key, expected_log=LOG)
    assert report.entries == 1


def test_callers_never_wait_for_a_held_head(node: Services, database: Database) -> None:
    """The old design locked the head in the caller's transaction: a held head blocked it."""
    if database.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time whatever the design")
    node.audit.append(decision(LOG, 0))  # the head exists
    holder = database.engine.connect()
    tx = holder.begin()
    holder.execute(text("SELECT * FROM audit_heads WHERE id = :t FOR UPDATE"), {"t": LOG})
    try:
        # A plain session (no after-commit sequencing): it must commit without the head,
        # and a wait for the head would fail at once instead of hanging.
        with Session(database.engine) as s:
            s.execute(text("SET LOCAL lock_timeout = '200ms'"))
            for i in range(1, 4):
                node.audit.append(decision(LOG, i), session=s)
            s.commit()
        assert _count(database, "audit_pending") == 3
    finally:
        tx.rollback()
        holder.close()
    node.audit.writer.sequence(LOG)
    assert [e["body"]["i"] for e in node.audit.entries(LOG)] == [0, 1, 2, 3]


def test_orphaned_intents_are_sequenced_by_the_sweep_and_checkpoints(node: Services) -> None:
    log = node.audit
    # Plain sessions: nothing sequences these after their commit, as if the process died.
    with Session(node.db.engine) as s:
        log.append_many([decision(LOG, i) for i in range(3)], session=s)
        s.commit()
    assert _count(node.db, "audit_pending") == 3 and _count(node.db, "audit_entries") == 0
    log.sign_due_checkpoints()
    assert _count(node.db, "audit_pending") == 0
    assert [e["seq"] for e in log.entries(LOG)] == [0, 1, 2]
    with Session(node.db.engine) as s:
        log.append(decision(LOG, 3), session=s)
        s.commit()
    # A checkpoint (and so every export) covers every intent committed before it.
    assert log.checkpoint_now(LOG).size == 4
    assert verify_export(_export(node), log.keys.public_key).entries == 4


def test_a_closed_log_refuses_intents(node: Services) -> None:
    node.audit.guard.alarm(LOG, "audit_history_mismatch", "test alarm")
    with pytest.raises(AuditLogAlarmedError), node.db.session() as s:
        node.audit.append(decision(LOG, 0), session=s)
    assert _count(node.db, "audit_pending") == 0


def test_two_nodes_give_one_tenant_one_total_order(
    node: Services, settings: Settings, db_url: str, clock: FixedClock
) -> None:
    other = Services(_settings(settings), clock=clock, db=Database(db_url))
    nodes = [node, other]
    errors: list[BaseException] = []

    def caller(n: int, t: int) -> None:
        try:
            for i in range(15):
                with nodes[n].db.session() as s:
                    nodes[n].audit.append(decision(LOG, t * 100 + i), session=s)
                if i % 5 == 0:  # the group-commit path of the same log, interleaved
                    nodes[n].audit.append(decision(LOG, t * 100 + 50 + i))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(t % 2, t)) for t in range(4)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        entries = node.audit.entries(LOG)
        assert [e["seq"] for e in entries] == list(range(4 * 18))
        for t in range(4):
            mine = [e["body"]["i"] for e in entries if e["body"]["i"] // 100 == t
                    and e["body"]["i"] % 100 < 50]
            assert mine == [t * 100 + i for i in range(15)]
        assert _count(node.db, "audit_pending") == 0
        assert verify_export(_export(other), node.audit.keys.public_key).entries == 72
    finally:
        other.close()
        other.db.dispose()


_KILLED = """
import os, signal, sys
from pathlib import Path
from sqlmodel import Session
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from tests.integration.audit.conftest import decision

url, home = sys.argv[1], Path(sys.argv[2])
svc = Services(Settings(home=home, database_url=url, audit_deferred_sequencing=True))
with Session(svc.db.engine) as s:
    svc.audit.append_many([decision("tn_deferred", i) for i in range(5)], session=s)
    s.commit()
print("committed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_intents_acknowledged_by_a_killed_process_are_not_lost(
    node: Services, db_url: str
) -> None:
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", _KILLED, db_url, str(node.settings.home)],
                          cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SANDBOXSEC_LOG_LEVEL": "warning"})
    assert proc.returncode == -signal.SIGKILL and "committed" in proc.stdout
    assert _count(node.db, "audit_pending") == 5
    node.audit.sign_due_checkpoints()  # any node's sweep
    assert [e["body"]["i"] for e in node.audit.entries(LOG)] == list(range(5))
    assert verify_export(_export(node), node.audit.keys.public_key).entries == 5


def test_a_log_that_cannot_advance_stops_taking_actions(node: Services) -> None:
    """Intents must not pile up behind a broken log: after a failed sequencing step the
    next audited action is refused (fail closed) until the log advances again."""
    with node.db.engine.begin() as c:
        c.execute(text("ALTER TABLE audit_entries RENAME TO audit_entries_away"))
    with node.db.session() as s:  # committed as an intent; its sequencing fails
        node.audit.append(decision(LOG, 0), session=s)
    with pytest.raises(AuditUnavailableError), node.db.session() as s:
        node.audit.append(decision(LOG, 1), session=s)
    assert _count(node.db, "audit_pending") == 1
    with node.db.engine.begin() as c:
        c.execute(text("ALTER TABLE audit_entries_away RENAME TO audit_entries"))
    with node.db.session() as s:
        node.audit.append(decision(LOG, 2), session=s)
    assert [e["body"]["i"] for e in node.audit.entries(LOG)] == [0, 2]
    assert verify_export(_export(node), node.audit.keys.public_key).entries == 2
