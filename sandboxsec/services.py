"""The service container: settings, clock, database, and each domain's service, built lazily.

Routes, the CLI and tests get everything through one :class:`Services`; nothing reads global
state.  Domain services take the container in their constructor and pick what they need.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from sandboxsec.clock import Clock, SystemClock
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database

if TYPE_CHECKING:
    from sandboxsec.attestation.service import AttestationService
    from sandboxsec.audit.log import AuditLog
    from sandboxsec.crypto.keys import KeyProvider
    from sandboxsec.crypto.service import TrajectoryService
    from sandboxsec.people.decisions import SignedDecisions
    from sandboxsec.people.service import PeopleService
    from sandboxsec.policy.service import PolicyService
    from sandboxsec.sessions.service import SessionService
    from sandboxsec.tenants.service import TenantService
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

    @cached_property
    def tenants(self) -> TenantService:
        from sandboxsec.tenants.service import TenantService

        return TenantService(self)

    @cached_property
    def audit(self) -> AuditLog:
        from sandboxsec.audit.log import AuditLog

        return AuditLog(self)

    @cached_property
    def keys(self) -> KeyProvider:
        from sandboxsec.crypto.keys import build_key_provider

        return build_key_provider(self.settings)

    @cached_property
    def trajectory(self) -> TrajectoryService:
        from sandboxsec.crypto.service import TrajectoryService

        return TrajectoryService(self)

    @cached_property
    def attestation(self) -> AttestationService:
        from sandboxsec.attestation.service import AttestationService

        return AttestationService(self)

    @cached_property
    def policy(self) -> PolicyService:
        from sandboxsec.policy.service import PolicyService

        return PolicyService(self)

    @cached_property
    def sessions(self) -> SessionService:
        from sandboxsec.sessions.service import SessionService

        return SessionService(self)

    @cached_property
    def people(self) -> PeopleService:
        from sandboxsec.people.service import PeopleService

        return PeopleService(db=self.db, clock=self.clock, settings=self.settings,
                             audit=self.audit)

    @cached_property
    def decisions(self) -> SignedDecisions:
        from sandboxsec.people.decisions import SignedDecisions

        return SignedDecisions(db=self.db, clock=self.clock, audit=self.audit,
                               people=self.people, policy=self.policy)

    @cached_property
    def webhooks(self) -> WebhookService:
        from sandboxsec.webhooks.service import WebhookService

        return WebhookService(db=self.db, clock=self.clock, settings=self.settings,
                              audit=self.audit, keys=lambda: self.keys)

    def close(self) -> None:
        """Stop background work of every service that was built, then close the database."""
        for name in ("webhooks", "policy", "trajectory", "attestation", "sessions", "audit",
                     "keys"):
            svc: Any = self.__dict__.get(name)
            closer = getattr(svc, "close", None)
            if callable(closer):
                closer()
        self.db.dispose()
