"""The store's bulk paths on SQLite and PostgreSQL: entry rows written at driver level are the
rows the Core insert writes, and proofs that read only the nodes they need equal the proofs of
the whole tree held in memory."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, text

from sandboxsec.audit.merkle import MerkleTree, ProofError
from sandboxsec.audit.store import ENTRIES, insert_entries
from sandboxsec.services import Services
from tests.integration.audit.conftest import decision, sql

LOG = "tn_store_paths"


def _rows(services: Services, log_id: str) -> list[tuple[object, ...]]:
    with services.db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            text("SELECT seq, event, time, entry, leaf_hash FROM audit_entries "
                 "WHERE tenant_id = :t ORDER BY seq"), {"t": log_id})]


def test_driver_level_entry_rows_equal_core_rows(audit_services: Services) -> None:
    at = datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=UTC)
    values = [(i, f"ev.{i}", '{"v":1,"x":"' + str(i) + ' é"}', bytes([i]) * 32) for i in range(5)]
    with audit_services.db.engine.begin() as conn:
        insert_entries(conn, "tn_driver", at, values)
        conn.execute(insert(ENTRIES), [
            {"tenant_id": "tn_core", "seq": s, "event": e, "time": at, "entry": line,
             "leaf_hash": h} for s, e, line, h in values])
    driver, core = _rows(audit_services, "tn_driver"), _rows(audit_services, "tn_core")
    assert len(driver) == 5
    assert driver == core
    # And read back through the model, the time is the same aware instant.
    with audit_services.db.engine.connect() as conn:
        from sqlalchemy import select

        got = conn.execute(select(ENTRIES.c.time).where(ENTRIES.c.tenant_id == "tn_driver")).all()
    assert {r[0].replace(tzinfo=r[0].tzinfo or UTC) for r in got} == {at}


def test_a_driver_level_duplicate_is_refused_like_a_core_one(audit_services: Services) -> None:
    at = datetime(2026, 12, 1, tzinfo=UTC)
    with audit_services.db.engine.begin() as conn:
        insert_entries(conn, "tn_dup", at, [(0, "e", "{}", b"\x01" * 32)])
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), audit_services.db.engine.begin() as conn:
        insert_entries(conn, "tn_dup", at, [(1, "e", "{}", b"\x02" * 32),
                                            (0, "e", "{}", b"\x03" * 32)])
    # Nothing of the refused batch stays.
    assert [r[0] for r in _rows(audit_services, "tn_dup")] == [0]


def test_stored_proofs_equal_the_whole_tree_in_memory(audit_services: Services) -> None:
    log = audit_services.audit
    for n in (1, 300, 99, 300, 333):
        log.append_many([decision(LOG, i) for i in range(n)])
    leaves = [bytes(r[4]) for r in _rows(audit_services, LOG)]
    assert len(leaves) == 1033
    whole = MerkleTree(leaves)
    for size in (1, 255, 256, 257, 700, 1000, 1024, 1033):
        stored = log.tree(LOG, size)
        assert stored.root() == whole.root(size)
        assert stored.frontier().hashes == whole.frontier(size).hashes
        for first in {0, 1, 8, 255, 256, 500, 512, size - 1, size}:
            if 0 <= first <= size:
                assert stored.consistency_proof(first) == whole.consistency_proof(first, size)
        for index in {i for i in (0, 255, 256, size // 2, size - 1) if i < size}:
            assert stored.inclusion_proof(index) == whole.inclusion_proof(index, size)


def test_a_missing_stored_node_gives_no_proof(audit_services: Services) -> None:
    log = audit_services.audit
    log.append_many([decision(LOG, i) for i in range(600)])
    sql(audit_services, "DELETE FROM audit_nodes WHERE tenant_id = :t AND level = 9", t=LOG)
    with pytest.raises(ProofError, match="missing"):
        log.tree(LOG, 600).inclusion_proof(599)
    with pytest.raises(ProofError, match="missing"):
        log.tree(LOG, 600).consistency_proof(520)
    with pytest.raises(ProofError, match="missing"):
        log.tree(LOG, 600).root()
    # Proofs that need no deleted node still work.
    assert log.tree(LOG, 600).inclusion_proof(5)
    assert log.tree(LOG, 600).consistency_proof(512)
