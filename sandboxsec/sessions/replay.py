"""The replay store of session proofs: each (key thumbprint, ``jti``) is accepted once.

The store is the database every worker shares: claiming a proof inserts its row under a
primary key made from the thumbprint and ``jti`` (``INSERT ... ON CONFLICT DO NOTHING
RETURNING``), so of two workers receiving the same proof at once exactly one wins.  A row
is kept until the proof could no longer pass the freshness window (``iat`` + max age +
skew), then purged.  When the database cannot record the claim the request is refused:
a proof that cannot be marked used is never accepted (fail closed).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import Table, bindparam, delete
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session

from sandboxsec.errors import SandboxSecError
from sandboxsec.sessions.errors import DpopReplayStoreUnavailableError
from sandboxsec.sessions.models import SessionProof
from sandboxsec.storage.db import Database, DriverStatement, after_commit

__all__ = ["ReplayStore"]

_PROOFS = cast(Table, SessionProof.__table__)  # type: ignore[attr-defined]
_PURGE_EVERY: Final = 1024


class ReplayStore:
    """Single use of proof ids across all workers, on the shared database."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._claims = 0
        # Compiled once and run on the driver's cursor: the claim runs on every
        # proof-carrying request, and SQLAlchemy's per-statement execution machinery costs
        # several times the one-row insert itself (DriverStatement keeps the writer lock,
        # the types' bind processing and the fail-closed error mapping).
        insert = pg_insert if db.is_postgres else sqlite_insert
        self._insert = DriverStatement(db, insert(_PROOFS)
                                       .values(id=bindparam("id"),
                                               tenant_id=bindparam("tenant_id"),
                                               expires_at=bindparam("expires_at"))
                                       .on_conflict_do_nothing().returning(_PROOFS.c.id))

    def claim(self, tenant_id: str, jkt: str, jti: str, *, keep_until: datetime,
              now: datetime, session: Session | None = None) -> bool:
        """True if this call is the first use of (``jkt``, ``jti``); False for a replay.

        In the caller's transaction when ``session`` is given (the claim then stands or falls
        with it); otherwise in its own, and :class:`DpopReplayStoreUnavailableError` is raised
        when the claim cannot be recorded.
        """
        params = {"id": hashlib.sha256(f"{jkt}.{jti}".encode()).hexdigest(),
                  "tenant_id": tenant_id, "expires_at": keep_until}
        if session is not None:
            won = self._insert.first(session.connection(), params)
        else:
            try:
                with self._db.connection() as conn:
                    won = self._insert.first(conn, params)
            except SandboxSecError as exc:
                raise DpopReplayStoreUnavailableError(
                    f"the proof replay store is unavailable ({exc.reason})") from None
        self._claims += 1
        if self._claims % _PURGE_EVERY == 0:
            if session is not None:
                # The caller's transaction may hold SQLite's writer lock until it commits; a
                # purge in a transaction of its own would wait for it, time out and drop
                # nothing (the table would only grow).  Purge once that transaction is done.
                after_commit(session, lambda: self.purge(now))
            else:
                self.purge(now)
        return won is not None

    def purge(self, now: datetime) -> None:
        """Drop rows of proofs that can no longer pass the freshness window."""
        table: Any = SessionProof
        try:
            with self._db.session() as s:
                s.execute(delete(SessionProof).where(table.expires_at < now))
        except SandboxSecError:
            return  # housekeeping only: the next purge retries
