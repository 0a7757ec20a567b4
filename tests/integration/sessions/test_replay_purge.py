"""Used proofs are purged once they can no longer pass the freshness window, also when the
claims are made inside the transactions of the requests they belong to (SQLite, PostgreSQL).

On SQLite that transaction holds the writer lock until it commits: a purge started inside it
in a transaction of its own waited for the lock, timed out and dropped nothing, so the table
only grew and every so many requests one stalled."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from sandboxsec.clock import FixedClock
from sandboxsec.sessions import replay
from sandboxsec.sessions.models import SessionProof
from sandboxsec.sessions.replay import ReplayStore
from sandboxsec.storage.db import Database


def _rows(db: Database) -> int:
    with db.session() as s:
        return int(s.execute(select(func.count()).select_from(SessionProof)).scalar_one())


def _store_with_expired(database: Database, clock: FixedClock, monkeypatch: pytest.MonkeyPatch,
                        *, purge_every: int, expired: int) -> tuple[ReplayStore, datetime]:
    """A store that purges every ``purge_every`` claims, holding ``expired`` proofs whose
    window has passed (claimed on their own); and the time now."""
    monkeypatch.setattr(replay, "_PURGE_EVERY", purge_every)
    store = ReplayStore(database)
    now = clock.now()
    old = now - timedelta(minutes=10)
    for n in range(expired):
        assert store.claim("tn_a", "jkt", f"old-{n}", keep_until=old, now=old)
    assert _rows(database) == expired
    return store, now


def test_claims_in_the_requests_transaction_are_purged_after_it_commits(
        database: Database, clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    # Three proofs whose window has passed.
    store, now = _store_with_expired(database, clock, monkeypatch, purge_every=4, expired=3)
    # The fourth claim (the purge's turn) is made in a request's transaction, with a write
    # before it as the decision would have made.
    with database.session() as s:
        assert store.claim("tn_a", "jkt", "fresh", keep_until=now + timedelta(minutes=5),
                           now=now, session=s)
    # The expired rows are gone; the fresh claim stays and is still refused when replayed.
    assert _rows(database) == 1
    assert not store.claim("tn_a", "jkt", "fresh", keep_until=now + timedelta(minutes=5),
                           now=now)


def test_a_rolled_back_request_leaves_its_proof_unused(
        database: Database, clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    store, now = _store_with_expired(database, clock, monkeypatch, purge_every=2, expired=1)

    class Refused(Exception):
        pass

    # The purge's turn falls in a request that is then refused (rolled back).
    with pytest.raises(Refused), database.session() as s:
        assert store.claim("tn_a", "jkt", "fresh", keep_until=now + timedelta(minutes=5),
                           now=now, session=s)
        raise Refused
    # The request never happened: its proof is unused and can be claimed now, once.
    assert store.claim("tn_a", "jkt", "fresh", keep_until=now + timedelta(minutes=5), now=now)
    assert not store.claim("tn_a", "jkt", "fresh", keep_until=now + timedelta(minutes=5),
                           now=now)
    # The next committed purge turn drops the expired row.
    for n in range(2):
        assert store.claim("tn_a", "jkt", f"more-{n}", keep_until=now + timedelta(minutes=5),
                           now=now)
    assert _rows(database) == 3
