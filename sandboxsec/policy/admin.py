"""Policy administration: a tenant's policy in force, validating and replacing it.

Version 0 of every tenant is the policy shipped with the package; each replacement is stored
as the next version, audited in the same transaction.  A policy that does not compile is
refused (audited) and the old one stays in force.
"""

from __future__ import annotations

from collections.abc import Callable

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.policy.engine import CompiledPolicy, PolicyEngine
from sandboxsec.policy.errors import PolicyVersionConflictError
from sandboxsec.policy.models import PolicyRevision
from sandboxsec.policy.repository import PolicyRepository
from sandboxsec.policy.views import PolicyView
from sandboxsec.principal import Principal

__all__ = ["PolicyAdmin"]


class PolicyAdmin:
    """Reads, validates and replaces the tenants' policies; the source of policy texts."""

    def __init__(self, repo: PolicyRepository, clock: Clock, audit: AuditSink,
                 engine: PolicyEngine, default_text: str,
                 on_change: Callable[[Principal], None] | None = None) -> None:
        """``on_change`` runs after a new policy is stored: it decides what is in flight
        again under it (pending requests; see policy/redecide.py)."""
        self._on_change = on_change
        self._repo = repo
        self._clock = clock
        self._audit = audit
        self._engine = engine
        self._default_text = default_text

    def text(self, tenant_id: str, version: int) -> str:
        """The text of version ``version`` of the tenant's policy (0: the shipped default)."""
        if version == 0:
            return self._default_text
        found = self._repo.revision_text(tenant_id, version)
        if found is None:
            # The version was read a moment ago in another transaction; it cannot vanish.
            raise SandboxSecError("policy revision disappeared")
        return found

    def get_policy(self, who: Principal) -> PolicyView:
        """The tenant's policy in force (version 0 is the shipped default)."""
        row = self._repo.latest_revision(who.tenant_id)
        if row is None:
            compiled = self._engine.compile(self._default_text)
            return PolicyView(who.tenant_id, 0, self._default_text, compiled.sha256,
                              len(compiled.rules), True, None, None)
        return PolicyView(who.tenant_id, row.version, row.text, row.sha256, row.rule_count,
                          False, row.created_at, row.created_by)

    def validate_policy(self, text_: str) -> CompiledPolicy:
        """Compile ``text_`` or raise ``PolicyInvalidError`` naming the failing line."""
        return self._engine.compile(text_)

    def replace_policy(self, who: Principal, text_: str, *, base_version: int | None = None
                       ) -> PolicyView:
        """Validate and install a new policy for the tenant; a bad one leaves the old in force.

        1. the text compiles (else refused with the failing line, audited);
        2. when ``base_version`` is given, it is still the version in force;
        3. the new revision is stored as version + 1, audited in the same transaction;
        4. pending requests the new policy denies are denied (approving and using a grant
           decide again too, so nothing in flight escapes a stricter policy).
        """
        # 1. validate before anything is stored
        try:
            compiled = self._engine.compile(text_)
        except SandboxSecError as exc:
            with self._repo.transaction() as tx:
                self._audit.append(
                    AuditRecord.by(who, AuditEvent.POLICY_UPDATE_REJECT, "refused",
                                   reason=exc.reason, body={"message": exc.message[:500]}),
                    session=tx,
                )
            raise
        now = self._clock.now()
        with self._repo.transaction() as tx:
            # 2. optimistic concurrency
            current = self._repo.current_version(tx, who.tenant_id)
            if base_version is not None and base_version != current:
                raise PolicyVersionConflictError(
                    f"the policy is at version {current}, not {base_version}"
                )
            # 3. store and audit together (a concurrent writer of the same version loses)
            row = PolicyRevision(
                id=new_id("pol"), tenant_id=who.tenant_id, version=current + 1, text=text_,
                sha256=compiled.sha256, rule_count=len(compiled.rules), created_at=now,
                created_by=who.key_id,
            )
            self._repo.add_revision(tx, row)
            self._audit.append(
                AuditRecord.by(who, AuditEvent.POLICY_UPDATE, "success",
                               object_ids={"policy_revision_id": row.id},
                               body={"version": row.version, "sha256": row.sha256,
                                     "rule_count": row.rule_count}),
                session=tx,
            )
        # 4. what is in flight is decided again under the new policy
        if self._on_change is not None:
            self._on_change(who)
        return PolicyView(who.tenant_id, row.version, row.text, row.sha256, row.rule_count,
                          False, row.created_at, row.created_by)
