"""Tenants and their API keys: creation, authentication, revocation."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from sqlalchemy import bindparam
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import NotFoundError, SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal, Role
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped
from sandboxsec.tenants.apikeys import generate_key, parse_key, secret_matches
from sandboxsec.tenants.errors import (
    ApiKeyInvalidError,
    TenantNameInvalidError,
    TenantNameTakenError,
)
from sandboxsec.tenants.models import ApiKey, Tenant
from sandboxsec.tenants.refusals import RefusalLimiter

__all__ = [
    "ApiKeyView",
    "CreatedTenant",
    "DeletedTenant",
    "IssuedKey",
    "KeyShredder",
    "Shredded",
    "TenantService",
    "TenantView",
]




# Built once: every request authenticates, and building the statement cost more than running
# it.  A Core connection, not an ORM session, for the same reason.
_KEY_LOOKUP = (
    sa_select(col(ApiKey.tenant_id), col(ApiKey.role), col(ApiKey.secret_sha256),
              col(ApiKey.revoked_at), col(Tenant.deleted_at))
    .join(Tenant, col(Tenant.id) == col(ApiKey.tenant_id))
    .where(col(ApiKey.id) == bindparam("key_id"))
)

@dataclass(frozen=True)
class IssuedKey:
    """A new API key, shown once."""

    key_id: str
    role: Role
    key: str


@dataclass(frozen=True)
class DeletedTenant:
    """What deleting a tenant destroyed."""

    tenant_id: str
    deleted_at: datetime
    keys_revoked: int
    keks_destroyed: int
    deks_destroyed: int
    #: The tenant's key in the key provider (file or HSM object) was destroyed.
    tenant_key_destroyed: bool = False


@dataclass(frozen=True)
class CreatedTenant:
    """A new tenant and one key per role."""

    tenant_id: str
    name: str
    keys: dict[Role, IssuedKey]


@dataclass(frozen=True)
class TenantView:
    """A tenant."""

    id: str
    name: str
    created_at: datetime
    deleted_at: datetime | None

    @classmethod
    def of(cls, row: Tenant) -> TenantView:
        """The view of a stored tenant row."""
        return cls(row.id, row.name, row.created_at, row.deleted_at)


@dataclass(frozen=True)
class ApiKeyView:
    """An API key as listed: never its secret, only its hash."""

    id: str
    tenant_id: str
    role: str
    secret_sha256: str
    label: str
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, row: ApiKey) -> ApiKeyView:
        """The view of a stored key row."""
        return cls(row.id, row.tenant_id, row.role, row.secret_sha256, row.label,
                   row.created_at, row.revoked_at)


class Shredded(Protocol):
    """What crypto-shredding a tenant destroyed."""

    @property
    def keks_destroyed(self) -> int: ...

    @property
    def deks_destroyed(self) -> int: ...

    @property
    def tenant_key_destroyed(self) -> bool: ...


class KeyShredder(Protocol):
    """Crypto-shreds a tenant's keys (key administration does)."""

    def shred_tenant(self, tenant_id: str, actor: Principal | None) -> Shredded:
        """Destroy the tenant's keys, idempotently; its data becomes unreadable."""
        ...


def _in_service_log(record: AuditRecord) -> AuditRecord:
    """A copy of a tenant-lifecycle record for the service log (it outlives the tenant)."""
    return replace(record, tenant_id=SERVICE_LOG,
                   object_ids={**record.object_ids, "tenant_id": str(record.tenant_id)})


def _valid_name(name: str) -> str:
    name = name.strip()
    if not (1 <= len(name) <= 200) or not name.isprintable():
        raise TenantNameInvalidError("tenant names are 1-200 printable characters")
    return name


class TenantService:
    """Creates tenants and keys, and turns a presented key into a :class:`Principal`."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink,
                 shredder: KeyShredder, refusals: RefusalLimiter | None = None) -> None:
        """``refusals`` bounds how many refused API keys are audited one by one (default:
        60 a minute per process)."""
        self._db = db
        self._clock = clock
        self._audit = audit
        self._shredder = shredder
        self._refusals = refusals or RefusalLimiter(60, 60.0)

    def create(self, name: str, *, actor: Principal | None = None) -> CreatedTenant:
        """Create a tenant with one key per role; audited in the same transaction."""
        name = _valid_name(name)
        now = self._clock.now()
        tenant_id = new_id("tn")
        keys: dict[Role, IssuedKey] = {}
        try:
            with self._db.session() as s:
                s.add(Tenant(id=tenant_id, name=name, created_at=now))
                s.flush()
                for role in Role:
                    keys[role] = self._add_key(s, tenant_id, role, now, label=f"initial {role}")
                record = AuditRecord.by(
                    actor, AuditEvent.TENANT_CREATE, "success", tenant_id=tenant_id,
                    object_ids={"tenant_id": tenant_id},
                    body={"name": name, "key_ids": {str(r): k.key_id for r, k in keys.items()}},
                )
                # The tenant's log and the service's: the lifecycle outlives the tenant.
                self._audit.append_many([record, _in_service_log(record)], session=s)
        except IntegrityError as exc:
            raise TenantNameTakenError(f"a tenant named {name!r} exists already") from exc
        return CreatedTenant(tenant_id=tenant_id, name=name, keys=keys)

    @staticmethod
    def _add_key(s: Session, tenant_id: str, role: Role, now: datetime, label: str) -> IssuedKey:
        full, key_id, digest = generate_key()
        s.add(ApiKey(id=key_id, tenant_id=tenant_id, role=str(role), secret_sha256=digest,
                     label=label, created_at=now))
        return IssuedKey(key_id=key_id, role=role, key=full)

    def create_key(self, tenant_id: str, role: Role, *, actor: Principal | None,
                   label: str = "") -> IssuedKey:
        """Issue one more key of ``role`` for ``tenant_id``."""
        now = self._clock.now()
        with self._db.session() as s:
            tenant = s.get(Tenant, tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                raise NotFoundError("no such tenant")
            issued = self._add_key(s, tenant_id, role, now, label=label[:200])
            self._audit.append(
                AuditRecord.by(
                    actor, AuditEvent.APIKEY_CREATE, "success", tenant_id=tenant_id,
                    object_ids={"key_id": issued.key_id},
                    body={"role": str(role), "label": label[:200]},
                ),
                session=s,
            )
        return issued

    def list_keys(self, tenant_id: str) -> list[ApiKeyView]:
        """Every key of the tenant (hashes only), newest first."""
        with self._db.session() as s:
            rows = s.exec(select(ApiKey).where(ApiKey.tenant_id == tenant_id)).all()
        return [ApiKeyView.of(r) for r in sorted(rows, key=lambda k: k.created_at, reverse=True)]

    def revoke_key(self, tenant_id: str, key_id: str, *, actor: Principal | None) -> None:
        """Revoke a key of this tenant; later requests with it are refused."""
        now = self._clock.now()
        with self._db.session() as s:
            row = get_scoped(s, ApiKey, tenant_id, key_id, what="API key")
            if row.revoked_at is None:
                row.revoked_at = now
                s.add(row)
            self._audit.append(
                AuditRecord.by(
                    actor, AuditEvent.APIKEY_REVOKE, "success", tenant_id=tenant_id,
                    object_ids={"key_id": key_id},
                ),
                session=s,
            )

    def authenticate(self, presented: str, *, remote: str | None = None) -> Principal:
        """The principal of a presented key, or :class:`ApiKeyInvalidError`.

        Read from the database on every request (one primary-key lookup joined to the
        tenant), never from a per-process cache: a revoked key, or a deleted tenant's, is
        refused by every worker process from the moment the revocation commits. Every
        refusal is audited in the service log (rate-limited, see
        :mod:`sandboxsec.tenants.refusals`); the caller gets the same opaque error whatever
        the cause.
        """
        try:
            parsed = parse_key(presented)
        except Exception as exc:
            self._refused(None, None, "malformed", remote)
            raise ApiKeyInvalidError("invalid API key") from exc
        with self._db.connection() as conn:
            row = conn.execute(_KEY_LOOKUP, {"key_id": parsed.key_id}).first()
        if row is None:
            self._refused(parsed.key_id, None, "unknown", remote)
            raise ApiKeyInvalidError("invalid API key")
        tenant_id, role, digest, revoked_at, deleted_at = row
        # The secret is compared even for a revoked key, so timing tells nothing about state.
        matches = secret_matches(parsed.secret, digest)
        why = (
            "revoked" if revoked_at is not None
            else "tenant_deleted" if deleted_at is not None
            else None if matches
            else "wrong_secret"
        )
        if why is not None:
            self._refused(parsed.key_id, tenant_id, why, remote)
            raise ApiKeyInvalidError("invalid API key")
        return Principal(tenant_id=tenant_id, key_id=parsed.key_id, role=Role(role))

    def _refused(self, key_id: str | None, tenant_id: str | None, why: str | None,
                 remote: str | None) -> None:
        """Audit one refused key in the service log, unless the rate limit says to count it."""
        admission = self._refusals.admit(self._clock.now().timestamp())
        if not admission.write:
            return
        body: dict[str, object] = {"why": why or "unknown", "suppressed": admission.suppressed}
        if key_id is not None:
            body["key_id"] = key_id  # the public half of a key; the secret is never logged
        if tenant_id is not None:
            body["key_tenant_id"] = tenant_id
        try:
            self._audit.append(AuditRecord(
                event=AuditEvent.AUTH_FAILURE, tenant_id=SERVICE_LOG, actor_key_id=None,
                actor_role=None, outcome="refused", reason=ApiKeyInvalidError.code, body=body,
                sensitive={"remote_addr": remote} if remote else {},
            ))
        except SandboxSecError:
            # The request is refused either way; the count is reported with the next entry.
            self._refusals.give_back(admission.suppressed + 1)

    def delete(self, tenant_id: str, *, actor: Principal | None) -> DeletedTenant:
        """Delete a tenant: crypto-shred its keys, then revoke every API key it has.

        Shredding comes first and is idempotent, so a deletion interrupted half-way is finished
        by running it again; the tenant stops authenticating only once its data is unreadable.
        """
        self.get(tenant_id)
        shred = self._shredder.shred_tenant(tenant_id, actor)
        now = self._clock.now()
        with self._db.session() as s:
            tenant = s.get(Tenant, tenant_id, with_for_update=True)
            if tenant is None or tenant.deleted_at is not None:
                raise NotFoundError("no such tenant")
            tenant.deleted_at = now
            s.add(tenant)
            revoked = 0
            for key in s.exec(select(ApiKey).where(ApiKey.tenant_id == tenant_id)).all():
                if key.revoked_at is None:
                    key.revoked_at = now
                    s.add(key)
                    revoked += 1
            record = AuditRecord.by(
                actor, AuditEvent.TENANT_DELETE, "success", tenant_id=tenant_id,
                object_ids={"tenant_id": tenant_id},
                body={"keys_revoked": revoked, "keks_destroyed": shred.keks_destroyed,
                      "deks_destroyed": shred.deks_destroyed,
                      "tenant_key_destroyed": shred.tenant_key_destroyed},
            )
            self._audit.append_many([record, _in_service_log(record)], session=s)
        return DeletedTenant(tenant_id=tenant_id, deleted_at=now, keys_revoked=revoked,
                             keks_destroyed=shred.keks_destroyed,
                             deks_destroyed=shred.deks_destroyed,
                             tenant_key_destroyed=shred.tenant_key_destroyed)

    def list(self) -> list[TenantView]:
        """Every live tenant, oldest first."""
        with self._db.session() as s:
            rows = s.exec(select(Tenant).where(col(Tenant.deleted_at).is_(None))).all()
        return [TenantView.of(t) for t in sorted(rows, key=lambda t: (t.created_at, t.id))]

    def get(self, tenant_id: str) -> TenantView:
        """The tenant, unless missing or deleted."""
        with self._db.session() as s:
            t = s.get(Tenant, tenant_id)
        if t is None or t.deleted_at is not None:
            raise NotFoundError("no such tenant")
        return TenantView.of(t)

    def find(self, name_or_id: str, *, include_deleted: bool = False) -> TenantView:
        """A live tenant by id or by name (or a deleted one, by id or its former name, when
        ``include_deleted``: its audit log outlives it)."""
        with self._db.session() as s:
            t = s.get(Tenant, name_or_id) or s.exec(
                select(Tenant).where(Tenant.name == name_or_id)
                .order_by(col(Tenant.created_at).desc())
            ).first()
        if t is None or (t.deleted_at is not None and not include_deleted):
            raise NotFoundError("no such tenant")
        return TenantView.of(t)
