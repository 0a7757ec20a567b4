"""The policy domain's storage, in one place: tenant-scoped queries and one-winner updates.

:class:`PolicyRepository` is what the policy services need from storage; a unit test hands
them an in-memory fake of it.  :class:`SqlPolicyRepository` is the database implementation:
every read is restricted to the caller's tenant (another tenant's row is indistinguishable
from none) and every state transition is a conditional ``UPDATE`` on the *from* state, so of
two concurrent callers exactly one wins.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import CursorResult, Table, bindparam, func, insert, text, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sandboxsec.errors import NotFoundError
from sandboxsec.ids import new_id
from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.policy.errors import PolicyVersionConflictError
from sandboxsec.policy.models import ApprovalRequest, GrantRecord, LoginDomain, PolicyRevision
from sandboxsec.policy.wakeup import CHANNEL
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.db import Database
from sandboxsec.storage.locks import lock_row
from sandboxsec.storage.tenancy import get_scoped, select_scoped

__all__ = ["DecidingSession", "IssuedGrant", "PolicyRepository", "SqlPolicyRepository", "Tx"]

#: An open transaction of the repository (a database session for the SQL implementation);
#: the audit sink writes its entries into the same one.
Tx = Any


@dataclass(frozen=True, slots=True)
class DecidingSession:
    """What a decision reads of its session: identity, attestation facts and lifetime."""

    id: str
    attested: bool
    image_name: str
    image_digest: str
    expires_at: datetime
    ended_at: datetime | None


@dataclass(frozen=True, slots=True)
class IssuedGrant:
    """A grant being issued: the columns of its new ``grants`` row (not used yet).

    A plain value rather than a :class:`GrantRecord`: the row is inserted with one Core
    statement, and setting up an ORM instance per decision cost more than the insert."""

    id: str
    tenant_id: str
    session_id: str
    approval_id: str | None
    decision_id: str
    action: str
    resource: str
    params_hash: str
    key_id: str
    issued_at: datetime
    expires_at: datetime


class PolicyRepository(Protocol):
    """What the policy services read and write; tenant-scoped, one-winner transitions."""

    def transaction(self) -> AbstractContextManager[Tx]:
        """A transaction: committed when the block ends, rolled back when it raises."""
        ...

    # -- policy revisions
    def current_version(self, tx: Tx, tenant_id: str) -> int:
        """The tenant's policy version in force (0: the shipped default)."""
        ...

    def latest_revision(self, tenant_id: str) -> PolicyRevision | None:
        """The tenant's newest stored revision."""
        ...

    def revision_text(self, tenant_id: str, version: int) -> str | None:
        """The text of revision ``version`` of the tenant."""
        ...

    def add_revision(self, tx: Tx, row: PolicyRevision) -> None:
        """Store a revision; ``PolicyVersionConflictError`` if its version exists."""
        ...

    # -- sessions and login domains
    def session(self, tx: Tx, tenant_id: str, session_id: str) -> AgentSession:
        """The tenant's session (``NotFoundError`` otherwise)."""
        ...

    def deciding_session(self, tx: Tx, tenant_id: str, session_id: str
                         ) -> tuple[DecidingSession, int]:
        """The tenant's session as a decision reads it (``NotFoundError`` otherwise) and the
        tenant's policy version in force, read together in ``tx``."""
        ...

    def domain_seen(self, tx: Tx, tenant_id: str, domain: str) -> bool:
        """Whether an agent of the tenant logged in to ``domain`` before."""
        ...

    def remember_domain(self, tx: Tx, tenant_id: str, domain: str, session_id: str,
                        now: datetime) -> None:
        """Record a first login to ``domain`` (a concurrent one is not an error)."""
        ...

    # -- approval requests
    def approval(self, tx: Tx, tenant_id: str, approval_id: str) -> ApprovalRequest:
        """The tenant's approval request (``NotFoundError`` otherwise)."""
        ...

    def lock_session(self, tx: Tx, tenant_id: str, session_id: str) -> None:
        """Hold the session until ``tx`` ends, so a count of its pending requests and the
        insert it allows are one atomic step (``storage.locks.lock_row``)."""
        ...

    def pending_approvals(self, tx: Tx, tenant_id: str, session_id: str, now: datetime
                          ) -> list[ApprovalRequest]:
        """The session's requests still pending at ``now``."""
        ...

    def list_approvals(self, tenant_id: str, *, state: ApprovalState | None,
                       session_id: str | None, limit: int, now: datetime
                       ) -> list[ApprovalRequest]:
        """The tenant's requests in ``state`` as of ``now``, newest first."""
        ...

    def add_approval(self, tx: Tx, row: ApprovalRequest) -> None:
        """Store a new pending request."""
        ...

    def decide_approval(self, tx: Tx, tenant_id: str, approval_id: str, state: ApprovalState,
                        now: datetime, decided_by: str, grant_id: str | None) -> bool:
        """``pending`` (and unexpired) -> ``state``; True for the one caller that won."""
        ...

    def expire_approval(self, tx: Tx, tenant_id: str, approval_id: str, now: datetime) -> bool:
        """``pending`` past its expiry -> ``expired``; True for the one caller that won."""
        ...

    def consume_approval(self, tx: Tx, tenant_id: str, approval_id: str) -> None:
        """``approved`` -> ``consumed`` (its grant was used)."""
        ...

    def announce(self, tx: Tx, approval_id: str) -> None:
        """Tell waiters in other processes, on commit, that the request changed."""
        ...

    # -- grants
    def add_grant(self, tx: Tx, record: IssuedGrant) -> None:
        """Store an issued grant."""
        ...

    def grant(self, tx: Tx, tenant_id: str, grant_id: str) -> GrantRecord:
        """The tenant's grant record (``NotFoundError`` otherwise)."""
        ...

    def find_grant(self, tx: Tx, tenant_id: str, grant_id: str) -> GrantRecord | None:
        """The tenant's grant record, or None."""
        ...

    def use_grant(self, tx: Tx, tenant_id: str, grant_id: str, now: datetime,
                  used_by: str) -> bool:
        """Mark an unused grant used; True for the one caller that won."""
        ...


_SESSIONS = cast(Table, AgentSession.__table__)  # type: ignore[attr-defined]
_REVISIONS = cast(Table, PolicyRevision.__table__)  # type: ignore[attr-defined]
_GRANTS = cast(Table, GrantRecord.__table__)  # type: ignore[attr-defined]
# Statements of every decision, built once (Core, not the ORM): building, cache-keying and
# loading ORM objects for them cost more than running them.  The session and the policy
# version in force are one round trip.
_DECIDING_SESSION = core_select(
    _SESSIONS.c.id, _SESSIONS.c.attested, _SESSIONS.c.image_name, _SESSIONS.c.image_digest,
    _SESSIONS.c.expires_at, _SESSIONS.c.ended_at,
    core_select(func.max(_REVISIONS.c.version))
    .where(_REVISIONS.c.tenant_id == bindparam("tenant_id"))
    .scalar_subquery().label("policy_version"),
).where(_SESSIONS.c.id == bindparam("session_id"),
        _SESSIONS.c.tenant_id == bindparam("tenant_id"))
_INSERT_GRANT = insert(_GRANTS)
_ISSUED_COLUMNS = IssuedGrant.__slots__


def _rowcount(result: Any) -> int:
    # UPDATE results are CursorResults; their rowcount is what makes a transition one-winner.
    return int(cast(CursorResult[Any], result).rowcount)


class SqlPolicyRepository:
    """:class:`PolicyRepository` on the service's database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @property
    def is_postgres(self) -> bool:
        """Whether notifications can reach other processes (PostgreSQL LISTEN/NOTIFY)."""
        return self._db.is_postgres

    def listen_url(self) -> str:
        """The libpq connection string a LISTEN connection uses."""
        return self._db.conninfo()

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A database session, committed when the block ends."""
        with self._db.session() as s:
            yield s

    def current_version(self, tx: Session, tenant_id: str) -> int:
        """The tenant's policy version in force (0: the shipped default)."""
        version = tx.exec(
            select(func.max(PolicyRevision.version)).where(PolicyRevision.tenant_id == tenant_id)
        ).one()
        return int(version or 0)

    def latest_revision(self, tenant_id: str) -> PolicyRevision | None:
        """The tenant's newest stored revision."""
        with self._db.session() as s:
            return s.exec(
                select(PolicyRevision)
                .where(PolicyRevision.tenant_id == tenant_id)
                .order_by(col(PolicyRevision.version).desc())
            ).first()

    def revision_text(self, tenant_id: str, version: int) -> str | None:
        """The text of revision ``version`` of the tenant."""
        with self._db.session() as s:
            row = s.exec(select(PolicyRevision).where(
                PolicyRevision.tenant_id == tenant_id, PolicyRevision.version == version
            )).first()
        return row.text if row is not None else None

    def add_revision(self, tx: Session, row: PolicyRevision) -> None:
        """Store a revision; ``PolicyVersionConflictError`` if its version exists."""
        tx.add(row)
        try:
            tx.flush()
        except IntegrityError as exc:
            raise PolicyVersionConflictError(
                "another change to this policy landed first; read it and try again"
            ) from exc

    def session(self, tx: Session, tenant_id: str, session_id: str) -> AgentSession:
        """The tenant's session (``NotFoundError`` otherwise)."""
        return get_scoped(tx, AgentSession, tenant_id, session_id, what="session")

    def deciding_session(self, tx: Session, tenant_id: str, session_id: str
                         ) -> tuple[DecidingSession, int]:
        """The tenant's session as a decision reads it and the policy version in force, in
        one statement (``NotFoundError`` for a missing or another tenant's session)."""
        row = tx.connection().execute(
            _DECIDING_SESSION, {"session_id": session_id, "tenant_id": tenant_id}).first()
        if row is None:
            raise NotFoundError("no such session")
        return (DecidingSession(id=row.id, attested=bool(row.attested),
                                image_name=row.image_name, image_digest=row.image_digest,
                                expires_at=row.expires_at, ended_at=row.ended_at),
                int(row.policy_version or 0))

    def domain_seen(self, tx: Session, tenant_id: str, domain: str) -> bool:
        """Whether an agent of the tenant logged in to ``domain`` before."""
        return tx.exec(select(LoginDomain.id).where(
            LoginDomain.tenant_id == tenant_id, LoginDomain.domain == domain
        )).first() is not None

    def remember_domain(self, tx: Session, tenant_id: str, domain: str, session_id: str,
                        now: datetime) -> None:
        """Record a first login to ``domain`` (a concurrent one is not an error)."""
        values = {"id": new_id("ld"), "tenant_id": tenant_id, "domain": domain,
                  "first_session_id": session_id, "first_seen_at": now}
        # ON CONFLICT DO NOTHING: a concurrent first login to the same domain must not fail
        # (or undo) this decision.
        insert = pg_insert if self._db.is_postgres else sqlite_insert
        tx.execute(insert(LoginDomain).values(**values).on_conflict_do_nothing())

    def approval(self, tx: Session, tenant_id: str, approval_id: str) -> ApprovalRequest:
        """The tenant's approval request (``NotFoundError`` otherwise)."""
        return get_scoped(tx, ApprovalRequest, tenant_id, approval_id, what="approval")

    def lock_session(self, tx: Session, tenant_id: str, session_id: str) -> None:
        """Hold the session row until ``tx`` ends (both databases: see ``lock_row``)."""
        lock_row(tx, AgentSession, tenant_id, session_id)

    def pending_approvals(self, tx: Session, tenant_id: str, session_id: str, now: datetime
                          ) -> list[ApprovalRequest]:
        """The session's requests still pending at ``now``."""
        return list(tx.exec(select(ApprovalRequest).where(
            ApprovalRequest.tenant_id == tenant_id,
            ApprovalRequest.session_id == session_id,
            ApprovalRequest.state == ApprovalState.PENDING.value,
            col(ApprovalRequest.expires_at) > now,
        )).all())

    def list_approvals(self, tenant_id: str, *, state: ApprovalState | None,
                       session_id: str | None, limit: int, now: datetime
                       ) -> list[ApprovalRequest]:
        """The tenant's requests in ``state`` as of ``now``, newest first.

        A pending request past its expiry counts as expired (its expiry is written when it
        is next read or decided).
        """
        query = select_scoped(ApprovalRequest, tenant_id)
        if session_id is not None:
            query = query.where(ApprovalRequest.session_id == session_id)
        if state is ApprovalState.PENDING:
            query = query.where(ApprovalRequest.state == state.value,
                                col(ApprovalRequest.expires_at) > now)
        elif state is ApprovalState.EXPIRED:
            query = query.where(
                (col(ApprovalRequest.state) == state.value)
                | ((col(ApprovalRequest.state) == ApprovalState.PENDING.value)
                   & (col(ApprovalRequest.expires_at) <= now)))
        elif state is not None:
            query = query.where(ApprovalRequest.state == state.value)
        query = query.order_by(col(ApprovalRequest.created_at).desc(),
                               col(ApprovalRequest.id)).limit(limit)
        with self._db.session() as s:
            return list(s.exec(query).all())

    def add_approval(self, tx: Session, row: ApprovalRequest) -> None:
        """Store a new pending request."""
        tx.add(row)

    def decide_approval(self, tx: Session, tenant_id: str, approval_id: str,
                        state: ApprovalState, now: datetime, decided_by: str,
                        grant_id: str | None) -> bool:
        """``pending`` (and unexpired) -> ``state``; True for the one caller that won."""
        return _rowcount(tx.execute(
            update(ApprovalRequest)
            .where(col(ApprovalRequest.id) == approval_id,
                   col(ApprovalRequest.tenant_id) == tenant_id,
                   col(ApprovalRequest.state) == ApprovalState.PENDING.value,
                   col(ApprovalRequest.expires_at) > now)
            .values(state=state.value, decided_at=now, decided_by=decided_by,
                    grant_id=grant_id)
        )) == 1

    def expire_approval(self, tx: Session, tenant_id: str, approval_id: str,
                        now: datetime) -> bool:
        """``pending`` past its expiry -> ``expired``; True for the one caller that won."""
        return _rowcount(tx.execute(
            update(ApprovalRequest)
            .where(col(ApprovalRequest.id) == approval_id,
                   col(ApprovalRequest.tenant_id) == tenant_id,
                   col(ApprovalRequest.state) == ApprovalState.PENDING.value,
                   col(ApprovalRequest.expires_at) <= now)
            .values(state=ApprovalState.EXPIRED.value)
        )) == 1

    def consume_approval(self, tx: Session, tenant_id: str, approval_id: str) -> None:
        """``approved`` -> ``consumed`` (its grant was used)."""
        tx.execute(
            update(ApprovalRequest)
            .where(col(ApprovalRequest.id) == approval_id,
                   col(ApprovalRequest.tenant_id) == tenant_id,
                   col(ApprovalRequest.state) == ApprovalState.APPROVED.value)
            .values(state=ApprovalState.CONSUMED.value)
        )

    def announce(self, tx: Session, approval_id: str) -> None:
        """Tell waiters in other processes, on commit, that the request changed."""
        # Delivered to other processes only when this transaction commits.
        if self._db.is_postgres:
            tx.execute(text("SELECT pg_notify(:channel, :payload)"),
                       {"channel": CHANNEL, "payload": approval_id})

    def add_grant(self, tx: Session, record: IssuedGrant) -> None:
        """Store an issued grant (one Core insert; ``used_at``/``used_by`` start empty)."""
        values = {name: getattr(record, name) for name in _ISSUED_COLUMNS}
        tx.connection().execute(_INSERT_GRANT, {**values, "used_at": None, "used_by": None})

    def grant(self, tx: Session, tenant_id: str, grant_id: str) -> GrantRecord:
        """The tenant's grant record (``NotFoundError`` otherwise)."""
        return get_scoped(tx, GrantRecord, tenant_id, grant_id, what="grant")

    def find_grant(self, tx: Session, tenant_id: str, grant_id: str) -> GrantRecord | None:
        """The tenant's grant record, or None."""
        record = tx.get(GrantRecord, grant_id)
        return record if record is not None and record.tenant_id == tenant_id else None

    def use_grant(self, tx: Session, tenant_id: str, grant_id: str, now: datetime,
                  used_by: str) -> bool:
        """Mark an unused grant used; True for the one caller that won."""
        return _rowcount(tx.execute(
            update(GrantRecord)
            .where(col(GrantRecord.id) == grant_id,
                   col(GrantRecord.tenant_id) == tenant_id,
                   col(GrantRecord.used_at).is_(None))
            .values(used_at=now, used_by=used_by)
        )) == 1
