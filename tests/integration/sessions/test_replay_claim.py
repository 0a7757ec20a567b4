"""The single-use claim of a proof id, as the request path runs it (on the driver's cursor,
SQLite and PostgreSQL): what it stores is what the ORM reads back, a claim blocked behind an
uncommitted claim of the same proof fails closed instead of winning, and what that other
transaction does decides the outcome (committed: a replay; rolled back: unused)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from datetime import timedelta

import pytest
from sqlalchemy import select

from sandboxsec.clock import FixedClock
from sandboxsec.errors import SandboxSecError
from sandboxsec.sessions.errors import DpopReplayStoreUnavailableError
from sandboxsec.sessions.models import SessionProof
from sandboxsec.sessions.replay import ReplayStore
from sandboxsec.storage.db import Database, DatabaseUnavailableError


@pytest.fixture
def impatient(database: Database) -> Iterator[Database]:
    # A second handle on the same database (another worker) that waits briefly for locks.
    db = Database(database.url, timeout_seconds=0.5)
    yield db
    db.dispose()


def test_a_claim_stores_what_the_orm_reads_back(database: Database, clock: FixedClock) -> None:
    store = ReplayStore(database)
    now = clock.now()
    keep = now + timedelta(seconds=66)  # whole seconds: the form the binding writes
    assert store.claim("tn_a", "jkt", "one", keep_until=keep, now=now)
    with database.session() as s:
        rows = s.execute(select(SessionProof)).scalars().all()
    assert [(r.tenant_id, r.expires_at) for r in rows] == [("tn_a", keep)]
    # The purge compares with what was stored: not before its time, then gone.
    store.purge(keep)
    assert not store.claim("tn_a", "jkt", "one", keep_until=keep, now=now)
    store.purge(keep + timedelta(microseconds=1))
    assert store.claim("tn_a", "jkt", "one", keep_until=keep, now=now)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_claim_behind_an_uncommitted_one_fails_closed(
        database: Database, impatient: Database, clock: FixedClock, outcome: str) -> None:
    first, second = ReplayStore(database), ReplayStore(impatient)
    now = clock.now()
    keep = now + timedelta(minutes=5)

    class Refused(Exception):
        pass

    with pytest.raises(Refused) if outcome == "rollback" else nullcontext():
        with database.session() as s:
            # A request's transaction has claimed the proof and not committed yet.
            assert first.claim("tn_a", "jkt", "p", keep_until=keep, now=now, session=s)
            # Another worker's claim of the same proof, on its own: refused as unavailable,
            # never a win.
            with pytest.raises(DpopReplayStoreUnavailableError):
                second.claim("tn_a", "jkt", "p", keep_until=keep, now=now)
            # ... and inside a request's transaction: the database error, fail closed.
            with pytest.raises(DatabaseUnavailableError), impatient.session() as other:
                second.claim("tn_a", "jkt", "p", keep_until=keep, now=now, session=other)
            if outcome == "rollback":
                raise Refused
    won = second.claim("tn_a", "jkt", "p", keep_until=keep, now=now)
    assert won is (outcome == "rollback")
    assert not first.claim("tn_a", "jkt", "p", keep_until=keep, now=now)


def test_the_unavailable_error_is_a_refusal_code(database: Database, impatient: Database,
                                                 clock: FixedClock) -> None:
    # What a client sees: its own reason code, not a server error.
    store, other = ReplayStore(database), ReplayStore(impatient)
    now = clock.now()
    with database.session() as s:
        store.claim("tn_a", "jkt", "q", keep_until=now, now=now, session=s)
        with pytest.raises(SandboxSecError) as err:
            other.claim("tn_a", "jkt", "q", keep_until=now, now=now)
    assert err.value.reason == "dpop_replay_store_unavailable"

