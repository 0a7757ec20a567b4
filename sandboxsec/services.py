"""The composition root: the one module that knows every domain and wires them together.

Routes, the CLI and benches get everything through one :class:`Services`; nothing reads
global state.  Each domain service is built here, lazily, from exactly the collaborators its
constructor names: the :class:`~sandboxsec.storage.db.Database`, the
:class:`~sandboxsec.clock.Clock`, an :class:`~sandboxsec.audit.sink.AuditSink`, the
:class:`~sandboxsec.crypto.keys.KeyProvider`, a small frozen config built from
:class:`~sandboxsec.settings.Settings`, and the one-method Protocols the domain declares
(a token verifier for sessions, a key shredder for tenants, ...).  No service holds
:class:`Services`; only ``api/``, ``cli/`` and ``bench/`` import this module.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from sandboxsec.attestation.config import AttestationConfig
from sandboxsec.attestation.service import AttestationService
from sandboxsec.audit.config import AuditConfig
from sandboxsec.audit.integrity import HistoryGuard
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.log import AuditLog
from sandboxsec.audit.publishing import build_guard
from sandboxsec.audit.reader import AuditReader, StoredTree
from sandboxsec.audit.writer import AuditWriter
from sandboxsec.clock import Clock, SystemClock
from sandboxsec.crypto.admin import KeyAdmin
from sandboxsec.crypto.config import KeyHierarchyConfig
from sandboxsec.crypto.hierarchy import KeyHierarchy
from sandboxsec.crypto.keys import KeyProvider, build_key_provider
from sandboxsec.crypto.service_keys import (
    ATTESTATION_NONCE,
    ATTESTATION_TOKEN,
    AUDIT_CHECKPOINT,
    AUDIT_HMAC,
    ServiceKeys,
)
from sandboxsec.crypto.signing import hsm_key_factory
from sandboxsec.crypto.tenant_keys import build_tenant_key_store
from sandboxsec.people.decisions import SignedDecisions
from sandboxsec.people.routes import PeopleRouting, passkey_approvals
from sandboxsec.people.service import PeopleService
from sandboxsec.policy.admin import PolicyAdmin
from sandboxsec.policy.approval_service import ApprovalService, Listener
from sandboxsec.policy.config import ApprovalConfig, GrantConfig, PolicyConfig
from sandboxsec.policy.decisions import DecisionService
from sandboxsec.policy.engine import PolicyEngine, bundled_default_policy
from sandboxsec.policy.grant_service import GrantService
from sandboxsec.policy.in_force import PolicyInForce
from sandboxsec.policy.keyed_audit import KeyedParamsAudit
from sandboxsec.policy.notify import WebhookNotifier
from sandboxsec.policy.repository import SqlPolicyRepository
from sandboxsec.policy.service import PolicyService
from sandboxsec.policy.signing import GrantKeyring
from sandboxsec.policy.wakeup import PgListener, Wakeups
from sandboxsec.sessions.binding import BindingConfig, SessionBinding
from sandboxsec.sessions.nonce_key import dpop_nonces
from sandboxsec.sessions.service import SessionConfig, SessionService
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from sandboxsec.tenants.refusals import RefusalLimiter
from sandboxsec.tenants.service import TenantService
from sandboxsec.trajectory.config import TrajectoryConfig
from sandboxsec.trajectory.service import TrajectoryService
from sandboxsec.webhooks.outbox import SqlOutbox
from sandboxsec.webhooks.service import WebhookService

__all__ = ["Services"]


class Services:
    """Everything one running service (or one CLI command, or one test) works with."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        clock: Clock | None = None,
        db: Database | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.clock: Clock = clock or SystemClock()
        self.db = db or Database(
            self.settings.resolved_database_url(),
            pool_size=self.settings.db_pool_size,
            timeout_seconds=self.settings.db_timeout_seconds,
        )

    # ------------------------------------------------------------------ keys and audit

    @cached_property
    def keys(self) -> KeyProvider:
        """The root key provider (local file or PKCS#11)."""
        return build_key_provider(self.settings)

    @cached_property
    def audit_writer(self) -> AuditWriter:
        """Appends and checkpoint signing: the :class:`AuditSink` every service gets."""
        return AuditWriter(self.db, self.clock, self._audit_keys, self._audit_config,
                           self._audit_guard)

    @cached_property
    def audit(self) -> AuditLog:
        """The audit log: writer and reader behind one handle."""
        reader = AuditReader(self.db, self._audit_keys, self._audit_config, self.audit_writer)
        return AuditLog(self.audit_writer, reader, self._audit_keys)

    @cached_property
    def _audit_guard(self) -> HistoryGuard:
        # Proofs for witnesses come from the stored tree; alarms are recorded by the writer
        # (late-bound: the writer is built with this guard).
        return build_guard(
            self.settings, self.db, self.clock, self._audit_keys,
            proof=lambda log_id, old, new: StoredTree(self.db, log_id, new).consistency_proof(
                old, new),
            sink=lambda: self.audit_writer,
        )

    @cached_property
    def service_keys(self) -> ServiceKeys:
        """The service's signing and MAC keys, held once for every node (in the database
        under the root key, or in the HSM); ``serve`` establishes them before starting."""
        keys = ServiceKeys(self.db, self.clock, self.keys, self.settings.home,
                           hsm_key_factory(self.keys))
        # Made now, before any transaction is open: on SQLite the first node's key creation
        # takes the writer lock, which a caller's open transaction would hold.
        keys.prepare()
        return keys

    @cached_property
    def _audit_keys(self) -> AuditKeys:
        sk = self.service_keys
        return AuditKeys(self.settings.home, self.settings.audit_origin,
                         shared=lambda: (sk.signer(AUDIT_CHECKPOINT), sk.secret(AUDIT_HMAC)))

    @cached_property
    def _audit_config(self) -> AuditConfig:
        s = self.settings
        return AuditConfig(origin=s.audit_origin, checkpoint_every=s.audit_checkpoint_every,
                           checkpoint_seconds=s.audit_checkpoint_seconds,
                           write_timeout_seconds=s.audit_write_timeout_seconds,
                           deferred=s.audit_deferred_sequencing)

    # ------------------------------------------------------------------ tenants and keys

    @cached_property
    def key_hierarchy(self) -> KeyHierarchy:
        """Tenants' keyrings, KEKs and DEKs under the root key."""
        s = self.settings
        config = KeyHierarchyConfig(cache_ttl_seconds=s.key_cache_ttl_seconds,
                                    cache_max_entries=s.key_cache_max_entries,
                                    dek_max_messages=s.dek_max_messages)
        return KeyHierarchy(self.db, self.clock, self.audit_writer, self.keys, config,
                            build_tenant_key_store(s, self.keys))

    @cached_property
    def key_admin(self) -> KeyAdmin:
        """Key status, rotation, rewrap, retirement and crypto-shredding."""
        return KeyAdmin(self.db, self.clock, self.audit_writer, self.key_hierarchy)

    @cached_property
    def tenants(self) -> TenantService:
        """Tenants and their API keys."""
        s = self.settings
        refusals = RefusalLimiter(s.auth_failure_audit_per_window,
                                  s.auth_failure_audit_window_seconds)
        return TenantService(self.db, self.clock, self.audit_writer, self.key_admin, refusals)

    @cached_property
    def trajectory(self) -> TrajectoryService:
        """Encrypted trajectory records and streams."""
        s = self.settings
        config = TrajectoryConfig(max_record_bytes=s.max_record_bytes,
                                  stream_threshold_bytes=s.stream_threshold_bytes,
                                  stream_segment_bytes=s.stream_segment_bytes)
        return TrajectoryService(self.db, self.clock, self.audit_writer, self.key_hierarchy,
                                 config)

    # ------------------------------------------------------------------ attestation, sessions

    @cached_property
    def attestation(self) -> AttestationService:
        """Nonces, AK binding, verification and attestation tokens."""
        s = self.settings
        config = AttestationConfig(home=s.home, trust_dir=s.resolved_trust_dir(),
                                   nonce_ttl_seconds=s.nonce_ttl_seconds,
                                   token_ttl_seconds=s.attestation_token_ttl_seconds,
                                   max_event_log_bytes=s.max_body_bytes)
        sk = self.service_keys
        return AttestationService(self.db, self.clock, self.audit_writer, config,
                                  token_signer=lambda: sk.signer(ATTESTATION_TOKEN),
                                  nonce_key=lambda: sk.secret(ATTESTATION_NONCE))

    @cached_property
    def sessions(self) -> SessionService:
        """Agent sessions, started from an affirming attestation token."""
        s = self.settings
        return SessionService(self.db, self.clock, self.audit_writer, self.attestation,
                              self.attestation,
                              SessionConfig(s.session_ttl_seconds, s.require_session_key),
                              proofs=self.session_binding)

    @cached_property
    def session_binding(self) -> SessionBinding:
        """Session proofs (DPoP by the TPM-held session key), their replay store, ending."""
        s = self.settings
        config = BindingConfig(public_url=s.public_url,
                               require_session_key=s.require_session_key,
                               max_age_seconds=s.dpop_max_age_seconds,
                               skew_seconds=s.dpop_clock_skew_seconds,
                               parallel_signature_check=s.dpop_parallel_signature_check)
        nonces = (dpop_nonces(s.home, s.dpop_nonce_lifetime_seconds, s.dpop_clock_skew_seconds)
                  if s.dpop_require_nonce else None)
        return SessionBinding(config, self.db, self.clock, self.audit_writer, nonces=nonces)

    # ------------------------------------------------------------------ policy

    @cached_property
    def _policy_repository(self) -> SqlPolicyRepository:
        return SqlPolicyRepository(self.db)

    @cached_property
    def policy_admin(self) -> PolicyAdmin:
        """The tenants' policies: read, validate, replace."""
        # After a change, pending requests are decided again (resolved at call time: the
        # approval service is built on the admin's policy texts).
        return PolicyAdmin(self._policy_repository, self.clock, self.audit_writer,
                           self._policy_engine, bundled_default_policy(),
                           on_change=lambda who: self.approvals.sweep_pending(who))

    @cached_property
    def _policy_in_force(self) -> PolicyInForce:
        return PolicyInForce(self._policy_repository, self._policy_engine,
                             self.policy_admin.text, passkeys=passkey_approvals)

    @cached_property
    def grants(self) -> GrantService:
        """Issuing, signing and spending grants."""
        # With an HSM the grant keys are made and used inside it.
        keyring = GrantKeyring(self.db, self.clock, self.keys, hsm=hsm_key_factory(self.keys))
        return GrantService(self._policy_repository, self.clock, self._policy_audit, keyring,
                            self._wakeups, GrantConfig(self.settings.grant_ttl_seconds),
                            self.key_hierarchy, in_force=self._policy_in_force)

    @cached_property
    def decisions(self) -> DecisionService:
        """Decisions on agent actions."""
        s = self.settings
        notifier = None
        if s.approval_webhook_url and s.approval_webhook_secret:
            notifier = WebhookNotifier(s.approval_webhook_url,
                                       s.approval_webhook_secret.encode("utf-8"),
                                       max_attempts=s.approval_webhook_max_attempts)
        config = PolicyConfig(approval_ttl_seconds=s.approval_ttl_seconds)
        return DecisionService(self._policy_repository, self.clock, self._policy_audit,
                               self._policy_engine, self.policy_admin,
                               self.grants, config, notifier, routing=PeopleRouting(),
                               outbox=SqlOutbox())

    @cached_property
    def approvals(self) -> ApprovalService:
        """Approval requests: list, read, decide, wait."""
        repo = self._policy_repository
        wakeups = self._wakeups
        factory = None
        if repo.is_postgres:
            def factory() -> Listener:
                return PgListener(repo.listen_url(), wakeups)
        config = ApprovalConfig(wait_max_seconds=self.settings.approval_wait_max_seconds,
                                recheck_seconds=self.settings.approval_recheck_seconds)
        return ApprovalService(repo, self.clock, self._policy_audit, self.grants, wakeups,
                               config, factory, in_force=self._policy_in_force,
                               routing=PeopleRouting(), outbox=SqlOutbox())

    @cached_property
    def policy(self) -> PolicyService:
        """Policy admin, decisions, approvals and grants behind one handle."""
        return PolicyService(self.policy_admin, self.decisions, self.approvals, self.grants)

    # ------------------------------------------------------------------ people, webhooks

    @cached_property
    def people(self) -> PeopleService:
        """People, their passkeys, sign-ins and session owners."""
        return PeopleService(db=self.db, clock=self.clock, settings=self.settings,
                             audit=self.audit_writer)

    @cached_property
    def person_approvals(self) -> SignedDecisions:
        """What a signed-in person sees, and their passkey-signed decisions."""
        return SignedDecisions(db=self.db, clock=self.clock, audit=self._policy_audit,
                               people=self.people, approvals=self.approvals,
                               digester=self.key_hierarchy)

    @cached_property
    def webhooks(self) -> WebhookService:
        """Per-tenant webhooks and the delivery worker of their outbox."""
        return WebhookService(db=self.db, clock=self.clock, settings=self.settings,
                              audit=self.audit_writer, keys=lambda: self.keys)

    @cached_property
    def _policy_audit(self) -> KeyedParamsAudit:
        # The policy services' records never carry a plain params hash (docs/encryption.md).
        return KeyedParamsAudit(self.audit_writer, self.key_hierarchy)

    @cached_property
    def _policy_engine(self) -> PolicyEngine:
        # One engine for admin and decisions: a policy compiled when it is installed is the
        # one decisions use.
        return PolicyEngine(cache_size=self.settings.policy_cache_size)

    @cached_property
    def _wakeups(self) -> Wakeups:
        return Wakeups()

    def close(self, *, keep_db: bool = False) -> None:
        """Stop background work of every service that was built, then close the database
        (``keep_db``: leave it open for another user of the same :class:`Database`)."""
        for name in ("webhooks", "approvals", "decisions", "key_hierarchy", "attestation",
                     "sessions", "audit_writer", "keys"):
            svc: Any = self.__dict__.get(name)
            closer = getattr(svc, "close", None)
            if callable(closer):
                closer()
        if not keep_db:
            self.db.dispose()
