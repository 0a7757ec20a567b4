"""In-memory fakes of the policy services' collaborators: repository, audit sink, grant keys.

The policy engine (casbin), the approval state machine and the grant format stay real; only
storage, the audit log and the key store are replaced, so a test builds one service in
microseconds and can make any collaborator misbehave.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.clock import FixedClock
from sandboxsec.errors import NotFoundError
from sandboxsec.policy.approvals import ApprovalState, effective_state
from sandboxsec.policy.errors import GrantSignatureInvalidError, PolicyVersionConflictError
from sandboxsec.policy.grants import key_id
from sandboxsec.policy.models import ApprovalRequest, GrantRecord, PolicyRevision
from sandboxsec.policy.repository import DecidingSession, IssuedGrant
from sandboxsec.principal import Principal, Role
from sandboxsec.sessions.models import AgentSession

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
TENANT, OTHER = "tn_a", "tn_b"
AGENT = Principal(TENANT, "key_agent", Role.AGENT)
APPROVER = Principal(TENANT, "key_approver", Role.APPROVER)
OTHER_AGENT = Principal(OTHER, "key_other_agent", Role.AGENT)
PAYMENT = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh",
           "iban": "DE89370400440532013000"}


@dataclass
class FakeTx:
    """One transaction of the fake repository."""

    committed: bool = False


class FakeAuditSink:
    """Keeps appended records; a record counts once its transaction committed."""

    def __init__(self) -> None:
        self.appended: list[tuple[FakeTx | None, AuditRecord]] = []
        self.down = False

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        return self.append_many([record], session=session)[0]

    def append_many(self, records: Sequence[AuditRecord], *, session: Any | None = None
                    ) -> list[AuditReceipt]:
        from sandboxsec.audit.errors import AuditUnavailableError

        if self.down:
            raise AuditUnavailableError("audit store down")
        out = []
        for r in records:
            self.appended.append((session, r))
            out.append(AuditReceipt(log_id=r.tenant_id or "_service", seq=len(self.appended)))
        return out

    def events(self) -> list[tuple[AuditEvent, str, str | None]]:
        """(event, outcome, reason) of every committed record, in order."""
        return [(r.event, r.outcome, r.reason) for tx, r in self.appended
                if tx is None or tx.committed]


@dataclass
class InMemoryPolicyRepository:
    """:class:`~sandboxsec.policy.repository.PolicyRepository` on dicts, with rollback."""

    sessions: dict[str, AgentSession] = field(default_factory=dict)
    approvals: dict[str, ApprovalRequest] = field(default_factory=dict)
    grants: dict[str, GrantRecord] = field(default_factory=dict)
    revisions: list[PolicyRevision] = field(default_factory=list)
    domains: set[tuple[str, str]] = field(default_factory=set)
    announced: list[str] = field(default_factory=list)
    transactions: int = 0

    @contextmanager
    def transaction(self) -> Iterator[FakeTx]:
        snapshot = (
            {k: v.model_copy() for k, v in self.approvals.items()},
            {k: v.model_copy() for k, v in self.grants.items()},
            list(self.revisions), set(self.domains), list(self.announced),
        )
        tx = FakeTx()
        self.transactions += 1
        try:
            yield tx
        except BaseException:
            (self.approvals, self.grants, self.revisions, self.domains,
             self.announced) = snapshot
            raise
        tx.committed = True

    # -- policy revisions
    def current_version(self, tx: FakeTx, tenant_id: str) -> int:
        return max((r.version for r in self.revisions if r.tenant_id == tenant_id), default=0)

    def latest_revision(self, tenant_id: str) -> PolicyRevision | None:
        mine = [r for r in self.revisions if r.tenant_id == tenant_id]
        return max(mine, key=lambda r: r.version) if mine else None

    def revision_text(self, tenant_id: str, version: int) -> str | None:
        return next((r.text for r in self.revisions
                     if r.tenant_id == tenant_id and r.version == version), None)

    def add_revision(self, tx: FakeTx, row: PolicyRevision) -> None:
        if self.revision_text(row.tenant_id, row.version) is not None:
            raise PolicyVersionConflictError("another change landed first")
        self.revisions.append(row)

    # -- sessions and login domains
    def session(self, tx: FakeTx, tenant_id: str, session_id: str) -> AgentSession:
        found = self.sessions.get(session_id)
        if found is None or found.tenant_id != tenant_id:
            raise NotFoundError("no such session")
        return found

    def deciding_session(self, tx: FakeTx, tenant_id: str, session_id: str
                         ) -> tuple[DecidingSession, int]:
        s = self.session(tx, tenant_id, session_id)
        return (DecidingSession(id=s.id, attested=bool(s.attested), image_name=s.image_name,
                                image_digest=s.image_digest, expires_at=s.expires_at,
                                ended_at=s.ended_at),
                self.current_version(tx, tenant_id))

    def domain_seen(self, tx: FakeTx, tenant_id: str, domain: str) -> bool:
        return (tenant_id, domain) in self.domains

    def remember_domain(self, tx: FakeTx, tenant_id: str, domain: str, session_id: str,
                        now: datetime) -> None:
        self.domains.add((tenant_id, domain))

    # -- approval requests
    def approval(self, tx: FakeTx, tenant_id: str, approval_id: str) -> ApprovalRequest:
        found = self.approvals.get(approval_id)
        if found is None or found.tenant_id != tenant_id:
            raise NotFoundError("no such approval")
        return found.model_copy()

    def lock_session(self, tx: FakeTx, tenant_id: str, session_id: str) -> None:
        # One thread at a time uses the fake: nothing to hold.
        return None

    def pending_approvals(self, tx: FakeTx, tenant_id: str, session_id: str, now: datetime
                          ) -> list[ApprovalRequest]:
        return [a.model_copy() for a in self.approvals.values()
                if a.tenant_id == tenant_id and a.session_id == session_id
                and a.state == ApprovalState.PENDING.value and a.expires_at > now]

    def list_approvals(self, tenant_id: str, *, state: ApprovalState | None,
                       session_id: str | None, limit: int, now: datetime
                       ) -> list[ApprovalRequest]:
        rows = [a for a in self.approvals.values() if a.tenant_id == tenant_id
                and (session_id is None or a.session_id == session_id)
                and (state is None
                     or effective_state(ApprovalState(a.state), a.expires_at, now) is state)]
        rows.sort(key=lambda a: (a.created_at, a.id), reverse=True)
        return [a.model_copy() for a in rows[:limit]]

    def add_approval(self, tx: FakeTx, row: ApprovalRequest) -> None:
        self.approvals[row.id] = row.model_copy()

    def decide_approval(self, tx: FakeTx, tenant_id: str, approval_id: str,
                        state: ApprovalState, now: datetime, decided_by: str,
                        grant_id: str | None) -> bool:
        row = self.approvals.get(approval_id)
        if (row is None or row.tenant_id != tenant_id
                or row.state != ApprovalState.PENDING.value or row.expires_at <= now):
            return False
        row.state, row.decided_at, row.decided_by, row.grant_id = (
            state.value, now, decided_by, grant_id)
        return True

    def expire_approval(self, tx: FakeTx, tenant_id: str, approval_id: str,
                        now: datetime) -> bool:
        row = self.approvals.get(approval_id)
        if (row is None or row.tenant_id != tenant_id
                or row.state != ApprovalState.PENDING.value or row.expires_at > now):
            return False
        row.state = ApprovalState.EXPIRED.value
        return True

    def consume_approval(self, tx: FakeTx, tenant_id: str, approval_id: str) -> None:
        row = self.approvals.get(approval_id)
        if (row is not None and row.tenant_id == tenant_id
                and row.state == ApprovalState.APPROVED.value):
            row.state = ApprovalState.CONSUMED.value

    def announce(self, tx: FakeTx, approval_id: str) -> None:
        self.announced.append(approval_id)

    # -- grants
    def add_grant(self, tx: FakeTx, record: IssuedGrant) -> None:
        self.grants[record.id] = GrantRecord(**{k: getattr(record, k)
                                                for k in IssuedGrant.__slots__})

    def grant(self, tx: FakeTx, tenant_id: str, grant_id: str) -> GrantRecord:
        found = self.find_grant(tx, tenant_id, grant_id)
        if found is None:
            raise NotFoundError("no such grant")
        return found

    def find_grant(self, tx: FakeTx, tenant_id: str, grant_id: str) -> GrantRecord | None:
        found = self.grants.get(grant_id)
        return found.model_copy() if found is not None and found.tenant_id == tenant_id else None

    def use_grant(self, tx: FakeTx, tenant_id: str, grant_id: str, now: datetime,
                  used_by: str) -> bool:
        row = self.grants.get(grant_id)
        if row is None or row.tenant_id != tenant_id or row.used_at is not None:
            return False
        row.used_at, row.used_by = now, used_by
        return True

    # -- helpers for tests
    def add_session(self, session_id: str = "ses_1", tenant_id: str = TENANT, *,
                    attested: bool = True, ttl: float = 3600, ended: bool = False
                    ) -> AgentSession:
        row = AgentSession(id=session_id, tenant_id=tenant_id, image_name="img",
                           image_digest="sha256:" + "0" * 64, ak_name="ak", attested=attested,
                           created_at=NOW, expires_at=NOW + timedelta(seconds=ttl),
                           ended_at=NOW if ended else None)
        self.sessions[session_id] = row
        return row


class FakeGrantSigner:
    """Grant keys in memory (the real one keeps them wrapped in the database)."""

    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.kid = key_id(self.private.public_key())

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        return self.kid, self.private

    def private_for(self, kid: str) -> Ed25519PrivateKey:
        if kid != self.kid:
            raise GrantSignatureInvalidError("the grant's signing key is gone")
        return self.private

    def cached_public_keys(self) -> dict[str, Ed25519PublicKey]:
        return {self.kid: self.private.public_key()}

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        return self.cached_public_keys()


class FakeDigester:
    """Keys params hashes with a fixed per-tenant key, as the key hierarchy does."""

    def params_hmac_in(self, session: Any | None, tenant_id: str, params_hash: str) -> str:
        import hashlib
        import hmac

        key = hashlib.sha256(b"fake digest key " + tenant_id.encode()).digest()
        return hmac.new(key, b"\x02" + params_hash.encode(), hashlib.sha256).hexdigest()


class FakeNotifier:
    """Keeps the webhook events it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[Mapping[str, Any]] = []
        self.closed = False

    def submit(self, event: Mapping[str, Any]) -> None:
        self.sent.append(event)

    def close(self) -> None:
        self.closed = True


class StaticPolicies:
    """Policy texts by version (0: the shipped default)."""

    def __init__(self, texts: Mapping[int, str] | None = None) -> None:
        from sandboxsec.policy.engine import bundled_default_policy

        self.texts = {0: bundled_default_policy(), **(texts or {})}

    def text(self, tenant_id: str, version: int) -> str:
        return self.texts[version]


def fixed_clock() -> FixedClock:
    """A clock at :data:`NOW` that moves only when the test says so."""
    return FixedClock(NOW)


@dataclass
class Kit:
    """The three policy services wired to fakes, and the fakes themselves."""

    repo: InMemoryPolicyRepository
    audit: FakeAuditSink
    signer: FakeGrantSigner
    clock: FixedClock
    notifier: FakeNotifier
    policies: StaticPolicies
    grants: Any
    approvals: Any
    decisions: Any


def build(texts: Mapping[int, str] | None = None) -> Kit:
    """Decisions, approvals and grants on fresh fakes (the engine is the real one)."""
    from sandboxsec.policy.approval_service import ApprovalService
    from sandboxsec.policy.config import ApprovalConfig, GrantConfig, PolicyConfig
    from sandboxsec.policy.decisions import DecisionService
    from sandboxsec.policy.engine import PolicyEngine
    from sandboxsec.policy.grant_service import GrantService
    from sandboxsec.policy.wakeup import Wakeups

    repo, audit, signer = InMemoryPolicyRepository(), FakeAuditSink(), FakeGrantSigner()
    clock, notifier, policies = fixed_clock(), FakeNotifier(), StaticPolicies(texts)
    wakeups = Wakeups()
    grants = GrantService(repo, clock, audit, signer, wakeups, GrantConfig(ttl_seconds=300),
                          FakeDigester())
    approvals = ApprovalService(repo, clock, audit, grants, wakeups,
                                ApprovalConfig(wait_max_seconds=5, recheck_seconds=0.05))
    decisions = DecisionService(repo, clock, audit, PolicyEngine(cache_size=8), policies,
                                grants, PolicyConfig(approval_ttl_seconds=600),
                                notifier)
    return Kit(repo, audit, signer, clock, notifier, policies, grants, approvals, decisions)
