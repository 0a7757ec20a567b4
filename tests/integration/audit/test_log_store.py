"""The audit log on SQLite and PostgreSQL: durable order, checkpoints, tampering, fail closed."""

from __future__ import annotations

import hashlib
import itertools
import threading
from typing import Any

import pytest

from sandboxsec.audit import AuditUnavailableError
from sandboxsec.audit.errors import (
    AuditChainBrokenError,
    AuditEntryOrderError,
    AuditRangeError,
    AuditVerificationError,
)
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import SERVICE_LOG
from sandboxsec.audit.verify import verify_entry_proof, verify_export
from sandboxsec.clock import FixedClock
from sandboxsec.errors import NotFoundError
from sandboxsec.services import Services
from tests.integration.audit.conftest import CHECKPOINT_EVERY, decision, sql

LOG = "tn_audit_test"


def _export(services: Services, log_id: str = LOG, **kw: Any) -> bytes:
    return b"".join(services.audit.export(log_id, **kw))


def _fill(services: Services, n: int, log_id: str = LOG) -> None:
    services.audit.append_many([decision(log_id, i) for i in range(n)])


def test_appends_are_sequenced_hashed_and_verify(audit_services: Services) -> None:
    log = audit_services.audit
    receipts = [log.append(decision(LOG, i)) for i in range(20)]
    assert [r.seq for r in receipts] == list(range(20))
    assert {r.log_id for r in receipts} == {LOG}
    report = verify_export(_export(audit_services), log.keys.public_key, expected_log=LOG)
    assert report.entries == 20 and report.tree_size == 20
    # Checkpoints were signed every CHECKPOINT_EVERY entries on the way, and kept.
    sizes = [c.size for c in log.reader.checkpoints(LOG)]
    assert sizes[: 20 // CHECKPOINT_EVERY] == [8, 16] and sizes[-1] == 20
    # A secret given as sensitive never reaches the store in clear, but can be matched.
    entry = log.entries(LOG)[3]
    assert "4111111111111111" not in str(log.entries(LOG))
    assert entry["hmac"]["card"] == log.hash_value(LOG, "4111111111111111")


def test_service_records_go_to_the_service_log(audit_services: Services) -> None:
    r = audit_services.audit.append(decision(None, 0, event=AuditEvent.TENANT_DELETE))
    assert r.log_id == SERVICE_LOG
    data = _export(audit_services, SERVICE_LOG)
    report = verify_export(data, audit_services.audit.keys.public_key)
    assert report.entries == 1


def test_an_entry_in_the_callers_transaction_commits_or_rolls_back_with_it(
    audit_services: Services,
) -> None:
    log = audit_services.audit
    with audit_services.db.session() as s:
        r = log.append(decision(LOG, 0), session=s)
        # Deferred sequencing (PostgreSQL) numbers the entry after the commit.
        assert (r.seq, r.pending) == ((-1, True) if log.writer.deferred else (0, False))
    assert [e["seq"] for e in log.entries(LOG)] == [0]
    with pytest.raises(RuntimeError), audit_services.db.session() as s:
        log.append(decision(LOG, 1), session=s)
        raise RuntimeError("the action failed after it was audited")
    assert log.size(LOG) == 1
    assert log.append(decision(LOG, 2)).seq == 1
    verify_export(_export(audit_services), log.keys.public_key)


def test_concurrent_appenders_get_one_total_order(audit_services: Services) -> None:
    log = audit_services.audit
    seqs: list[int] = []
    lock = threading.Lock()

    def grouped(t: int) -> None:
        for i in range(25):
            r = log.append(decision(LOG, t * 100 + i))
            with lock:
                seqs.append(r.seq)

    def in_session(t: int) -> None:
        for i in range(10):
            with audit_services.db.session() as s:
                log.append(decision(LOG, t * 100 + i), session=s)

    threads = [threading.Thread(target=grouped, args=(t,)) for t in range(6)]
    threads += [threading.Thread(target=in_session, args=(t,)) for t in range(6, 8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seqs)) == 6 * 25
    entries = log.entries(LOG)
    assert [e["seq"] for e in entries] == list(range(6 * 25 + 2 * 10))
    assert set(seqs) <= {e["seq"] for e in entries}
    # Each in-transaction record is there once, and each caller's records in its order.
    for t in range(6, 8):
        mine = [e["body"]["i"] for e in entries if e["body"]["i"] // 100 == t]
        assert mine == [t * 100 + i for i in range(10)]
    assert verify_export(_export(audit_services), log.keys.public_key).entries == 170


def test_time_based_checkpoints(audit_services: Services, clock: FixedClock) -> None:
    log = audit_services.audit
    log.append(decision(LOG, 0))
    assert log.latest_checkpoint(LOG) is None
    clock.advance(audit_services.settings.audit_checkpoint_seconds + 1)
    assert log.sign_due_checkpoints() == 1
    latest = log.latest_checkpoint(LOG)
    assert latest is not None and latest.size == 1
    # An append after the period also signs, in its own transaction.
    clock.advance(audit_services.settings.audit_checkpoint_seconds + 1)
    log.append(decision(LOG, 1))
    latest = log.latest_checkpoint(LOG)
    assert latest is not None and latest.size == 2


def test_partial_exports_and_proofs_verify(audit_services: Services) -> None:
    log = audit_services.audit
    _fill(audit_services, 30)
    first = log.checkpoint_now(LOG)
    report = verify_export(_export(audit_services, start=10, end=20), log.keys.public_key)
    # One batch of 30 is one commit, checkpointed once at 30: the export extends to it.
    assert (report.first_seq, report.end_seq) == (10, 30)
    _fill(audit_services, 5)
    # The auditor kept the checkpoint of size 30; the new export must extend it.
    data = _export(audit_services, start=32, since=30)
    verify_export(data, log.keys.public_key, previous_checkpoints=[first.note])
    bundle = log.inclusion(LOG, 7)
    assert verify_entry_proof(bundle, log.keys.public_key).seq == 7
    proof = log.consistency(LOG, 30, 35)
    assert proof["first"] == 30 and proof["second"] == 35
    with pytest.raises(AuditRangeError):
        log.inclusion(LOG, 35)
    with pytest.raises(AuditRangeError):
        _export(audit_services, start=50)
    with pytest.raises(AuditRangeError):
        log.consistency(LOG, 9, 35)


# ------------------------------------------------------------------------------ tampering


def _swap(services: Services, k: int) -> None:
    sql(services, "UPDATE audit_entries SET seq = -1 WHERE tenant_id = :t AND seq = :k", t=LOG, k=k)
    sql(services, "UPDATE audit_entries SET seq = :k WHERE tenant_id = :t AND seq = :n",
        t=LOG, k=k, n=k + 1)
    sql(services, "UPDATE audit_entries SET seq = :n WHERE tenant_id = :t AND seq = -1",
        t=LOG, n=k + 1)


def _insert_before(services: Services, k: int) -> None:
    # Make room (two steps so no unique constraint trips), then insert a forged entry at k.
    sql(services, "UPDATE audit_entries SET seq = seq + 1000000 WHERE tenant_id = :t AND seq >= :k",
        t=LOG, k=k)
    sql(services, "UPDATE audit_entries SET seq = seq - 999999 WHERE tenant_id = :t "
        "AND seq >= 1000000", t=LOG)
    genuine = services.audit.entries(LOG, start=k + 1, end=k + 2)[0]
    import json

    forged = json.dumps({**genuine, "seq": k, "outcome": "deny"}, separators=(",", ":"))
    sql(services, "INSERT INTO audit_entries (tenant_id, seq, event, time, entry, leaf_hash) "
        "SELECT tenant_id, :k, event, time, :e, :h FROM audit_entries "
        "WHERE tenant_id = :t AND seq = :n", t=LOG, k=k, n=k + 1, e=forged,
        h=hashlib.sha256(b"\x00" + forged.encode()).digest())


TAMPER = {
    "edit": lambda s, k: sql(
        s, "UPDATE audit_entries SET entry = replace(entry, '\"outcome\":\"allow\"', "
        "'\"outcome\":\"deny\"') WHERE tenant_id = :t AND seq = :k", t=LOG, k=k),
    "delete": lambda s, k: sql(
        s, "DELETE FROM audit_entries WHERE tenant_id = :t AND seq = :k", t=LOG, k=k),
    "reorder": _swap,
    "insert": _insert_before,
}


@pytest.mark.parametrize("how", sorted(TAMPER))
@pytest.mark.parametrize("k", [0, 13])
def test_tampering_with_a_row_is_detected_and_named(
    audit_services: Services, how: str, k: int
) -> None:
    _fill(audit_services, 24)
    audit_services.audit.checkpoint_now(LOG)
    TAMPER[how](audit_services, k)
    with pytest.raises(AuditVerificationError) as exc:
        verify_export(_export(audit_services), audit_services.audit.keys.public_key)
    assert exc.value.seq == k
    if how == "edit":
        assert isinstance(exc.value, AuditChainBrokenError)
    if how in ("delete", "reorder"):
        assert isinstance(exc.value, AuditEntryOrderError)


# ---------------------------------------------------------------------------- fail closed


def test_a_missing_audit_table_makes_the_audited_action_fail(audit_services: Services) -> None:
    sql(audit_services, "DROP TABLE audit_entries")
    # Deferred sequencing keeps a caller's records as intents: that table is the log too.
    sql(audit_services, "DROP TABLE audit_pending")
    with pytest.raises(AuditUnavailableError) as exc:
        audit_services.tenants.create("never-created")
    assert exc.value.code == "audit_unavailable" and exc.value.status == 503
    with pytest.raises(NotFoundError):
        audit_services.tenants.find("never-created")
    with pytest.raises(AuditUnavailableError):
        audit_services.audit.append(decision(LOG, 0))


def test_a_hung_store_denies_within_the_timeout(
    audit_services: Services, settings: Any, clock: FixedClock
) -> None:
    db = audit_services.db
    quick = Services(
        settings.model_copy(update={"audit_write_timeout_seconds": 0.5}), clock=clock, db=db
    )
    quick.audit.append(decision(LOG, 0))  # the head row exists
    # Another transaction holds the log's head (as a stuck writer would).
    conn = db.engine.connect()
    try:
        if db.is_sqlite:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
            conn.exec_driver_sql(f"SELECT 1 FROM audit_heads WHERE id = '{LOG}' FOR UPDATE")
        with pytest.raises(AuditUnavailableError):
            quick.audit.append(decision(LOG, 1))
    finally:
        conn.exec_driver_sql("ROLLBACK")
        conn.close()
    quick.audit.close()
    # Over-reporting is allowed (the timed-out entry may land later), losing entries is not.
    verify_export(_export(audit_services), audit_services.audit.keys.public_key)


def test_an_unreachable_database_fails_closed(settings: Any, clock: FixedClock) -> None:
    from sandboxsec.storage.db import Database

    dead = Database("postgresql+psycopg://nobody@127.0.0.1:1/none", timeout_seconds=1)
    svc = Services(settings.model_copy(update={"audit_write_timeout_seconds": 3.0}),
                   clock=clock, db=dead)
    try:
        with pytest.raises(AuditUnavailableError):
            svc.audit.append(decision(LOG, 0))
        with pytest.raises(AuditUnavailableError):
            svc.audit.checkpoint_now(LOG)
    finally:
        svc.close()


_WORKER = """
import sys
from pathlib import Path
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from tests.integration.audit.conftest import decision

url, home, worker = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
svc = Services(Settings(home=home, database_url=url, audit_checkpoint_every=16))
try:
    for i in range(30):
        if i % 3:
            svc.audit.append(decision("tn_audit_test", worker * 1000 + i))
        else:
            with svc.db.session() as s:
                svc.audit.append(decision("tn_audit_test", worker * 1000 + i), session=s)
finally:
    svc.close()
"""


def test_worker_processes_share_one_total_order(audit_services: Services, db_url: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    home = audit_services.settings.home
    root = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, db_url, str(home), str(w)], cwd=root)
        for w in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    log = audit_services.audit
    entries = log.entries(LOG)
    assert [e["seq"] for e in entries] == list(range(60))
    assert sorted(e["body"]["i"] for e in entries) == sorted(
        w * 1000 + i for w in range(2) for i in range(30)
    )
    verify_export(_export(audit_services), log.keys.public_key)


def test_proofs_over_stored_nodes_of_a_larger_log(audit_services: Services) -> None:
    # 700 entries in uneven batches: subtrees of 256 and 512 leaves are stored as nodes, and
    # every proof or frontier is built from them plus at most a few blocks of leaf hashes.
    log = audit_services.audit
    for n in (1, 300, 99, 300):
        audit_services.audit.append_many([decision(LOG, i) for i in range(n)])
    with audit_services.db.engine.connect() as conn:
        from sqlalchemy import text

        levels = conn.execute(
            text("SELECT level, idx FROM audit_nodes WHERE tenant_id = :t ORDER BY level, idx"),
            {"t": LOG},
        ).all()
    assert [tuple(r) for r in levels if r[0] >= 9] == [(9, 0)]
    assert (8, 0) in [tuple(r) for r in levels] and (8, 1) in [tuple(r) for r in levels]
    pub = log.keys.public_key
    kept = log.checkpoint_now(LOG)
    for start in (0, 255, 256, 301, 699):
        verify_export(_export(audit_services, start=start), pub, previous_checkpoints=[kept.note])
    sizes = [c.size for c in log.reader.checkpoints(LOG)]
    for a, b in itertools.pairwise(sizes):
        assert log.consistency(LOG, a, b)["first"] == a
    for seq in (0, 255, 256, 511, 512, 699):
        assert verify_entry_proof(log.inclusion(LOG, seq), pub).seq == seq
    # A damaged node store makes proofs unavailable, never wrong-but-accepted.
    sql(audit_services, "UPDATE audit_nodes SET hash = :h WHERE tenant_id = :t AND level = 9",
        h=b"\x00" * 32, t=LOG)
    with pytest.raises(AuditVerificationError):
        verify_entry_proof(log.inclusion(LOG, 600), pub)
