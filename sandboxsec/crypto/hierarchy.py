"""The key hierarchy: the root key guards each tenant's own key, which wraps the tenant's
versioned KEKs; a KEK wraps the DEKs; KEK version 1 also yields the tenant's digest key.

The tenant key is held by the key provider outside the database
(:mod:`sandboxsec.crypto.tenant_keys`); crypto-shredding destroys it.

A DEK seals the records of one session (a fresh DEK per process and session, at most
``dek_max_messages`` seals each, handed out as :class:`~sandboxsec.crypto.keyring.WriteLease`).
Unwrapped keys are cached briefly.  This module owns every query on the keyring, KEK and DEK
tables; key administration (:mod:`.admin`) and trajectories (:mod:`sandboxsec.trajectory`)
go through it.

Fail closed: a root key that cannot be used raises before anything is returned or stored.
"""

from __future__ import annotations

import os
import threading
import weakref
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.crypto.config import KeyHierarchyConfig
from sandboxsec.crypto.digests import derive_digest_key, params_hmac
from sandboxsec.crypto.envelope import (
    KEY_BYTES,
    DataKey,
    encode_context,
    unwrap_secret,
    wrap_secret,
)
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderMismatchError,
    KeyProviderUnavailableError,
    KeyVersionConflictError,
    KeyVersionRetiredError,
    TenantKeyMissingError,
    TenantKeysShreddedError,
)
from sandboxsec.crypto.keyring import TtlCache, WriteLease
from sandboxsec.crypto.keys import KeyProvider
from sandboxsec.crypto.models import DataEncryptionKey, KeyEncryptionKey, TenantKeyring
from sandboxsec.crypto.tenant_keys import TenantKeyStore, is_tenant_wrapped
from sandboxsec.errors import NotFoundError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.storage.db import Database, DatabaseUnavailableError

__all__ = ["KeyHierarchy", "actor_fields", "dek_aad", "kek_aad", "key_event"]


def kek_aad(tenant_id: str, version: int) -> bytes:
    """The associated data binding a wrapped KEK to its tenant and version."""
    return encode_context("sandboxsec/kek/v1", tenant_id, str(version))


def dek_aad(tenant_id: str, dek_id: str, kek_version: int) -> bytes:
    """The associated data binding a wrapped DEK to its tenant, id and KEK version."""
    return encode_context("sandboxsec/dek/v1", tenant_id, dek_id, str(kek_version))


def actor_fields(actor: Principal | None) -> tuple[str | None, str]:
    """The audit actor fields of a key change (``operator`` when run from the CLI)."""
    if actor is None:
        return None, "operator"
    return actor.key_id, str(actor.role)


def key_event(event: AuditEvent, tenant_id: str, actor: Principal | None,
              body: dict[str, Any]) -> AuditRecord:
    """The audit record of a successful change to a tenant's keys (create, rotate, rewrap,
    retire, shred): every one names the tenant and the actor the same way."""
    key_id, role = actor_fields(actor)
    return AuditRecord(event=event, tenant_id=tenant_id, actor_key_id=key_id, actor_role=role,
                       outcome="success", object_ids={"tenant_id": tenant_id}, body=body)


_KEYRINGS = cast(Table, TenantKeyring.__table__)  # type: ignore[attr-defined]
_KEKS = cast(Table, KeyEncryptionKey.__table__)  # type: ignore[attr-defined]

#: Every live hierarchy, so a forked child drops the parent's write leases (``_after_fork``).
_LIVE: weakref.WeakSet[KeyHierarchy] = weakref.WeakSet()


def _after_fork() -> None:
    # Parent and child must not both seal under one DEK: its message bound would not hold.
    for hierarchy in list(_LIVE):
        hierarchy.leases.clear()


os.register_at_fork(after_in_child=_after_fork)


class KeyHierarchy:
    """Tenants' keyrings, KEKs and DEKs: creation, unwrapping, caching and write leases."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink, provider: KeyProvider,
                 config: KeyHierarchyConfig, tenant_keys: TenantKeyStore) -> None:
        _LIVE.add(self)
        self._db = db
        self._clock = clock
        self._audit = audit
        self.provider = provider
        #: The per-tenant keys held by the key provider (what shredding destroys).
        self.tenant_keys = tenant_keys
        ttl = float(config.cache_ttl_seconds)
        size = int(config.cache_max_entries)
        self._keks: TtlCache[tuple[str, int], bytes] = TtlCache(size, ttl)
        self._deks: TtlCache[tuple[str, str, int], DataKey] = TtlCache(size, ttl)
        self.leases: TtlCache[tuple[str, str], WriteLease] = TtlCache(size, ttl)
        self._digest_keys: TtlCache[str, bytes] = TtlCache(size, ttl)
        self._lease_lock = threading.Lock()
        #: Seals one DEK makes before a fresh one is used (a test may lower it).
        self.max_messages = int(config.dek_max_messages)

    # ------------------------------------------------------------------ keyrings and KEKs

    def _create_keyring(self, s: Session, tenant_id: str, actor: Principal | None, *,
                        for_update: bool = False) -> TenantKeyring:
        """Make the tenant's keyring and KEK version 1, or use those a concurrent transaction
        made first.

        Several processes or threads may make a tenant's first keys at the same moment, each
        inside its caller's transaction.  The keyring row is inserted first with ``ON CONFLICT
        DO NOTHING``: PostgreSQL makes a second inserter wait on the unique key until the first
        commits (then inserts nothing) or rolls back (then inserts); on SQLite the writer lock
        taken by the insert orders the transactions the same way.  Only the transaction whose
        insert took makes the tenant key, KEK version 1 and the ``key.create`` audit entry; the
        others re-read and use the committed ones.  No savepoint is needed, so the caller's
        transaction stays usable whichever way it goes.
        """
        now = self._clock.now()
        made = s.execute(
            self._insert(_KEYRINGS).values(
                id=tenant_id, tenant_id=tenant_id, current_version=1, min_decryption_version=1,
                created_at=now, updated_at=now,
            ).on_conflict_do_nothing().returning(_KEYRINGS.c.id)
        ).first()
        if made is None:
            # Another transaction made (and committed) the tenant's first keys: use them.
            return self.keyring(s, tenant_id, for_update=for_update)
        self.add_kek(s, tenant_id, 1, now)
        self._audit.append(
            key_event(AuditEvent.KEY_CREATE, tenant_id, actor,
                      {"version": 1, "provider": self.provider.provider_id}),
            session=s,
        )
        return self.keyring(s, tenant_id, for_update=for_update)

    def _insert(self, table: Table) -> Any:
        """``INSERT`` in the database's dialect (for ``ON CONFLICT DO NOTHING``)."""
        return pg_insert(table) if self._db.is_postgres else sqlite_insert(table)

    def add_kek(self, s: Session, tenant_id: str, version: int, now: datetime) -> bytes:
        """Make, wrap and add KEK ``version`` of the tenant; returns its material.

        Raises :class:`KeyVersionConflictError` if the version exists already (the caller
        holds the keyring, so only a caller that did not lock it can hit that).
        """
        provider = self.provider
        if not provider.has_root_key():
            # A provider makes its root key on first use.  If keys wrapped by a root key exist
            # already, the root key is lost or misconfigured: making a new one would hide that.
            existing = s.exec(select(func.count()).select_from(KeyEncryptionKey)).one()
            if existing:
                raise KeyProviderUnavailableError(
                    f"the configured root key is missing while {existing} tenant keys wrapped "
                    "by a root key exist; restore the root key instead of making a new one"
                )
        material = os.urandom(KEY_BYTES)
        wrapped = self.tenant_keys.wrap(tenant_id, material, kek_aad(tenant_id, version),
                                        create=self._may_create_tenant_key(s, tenant_id))
        made = s.execute(
            self._insert(_KEKS).values(
                id=new_id("kek"), tenant_id=tenant_id, version=version,
                provider_id=provider.provider_id, wrapped_key=wrapped, created_at=now,
            ).on_conflict_do_nothing().returning(_KEKS.c.id)
        ).first()
        if made is None:
            raise KeyVersionConflictError(
                f"key version {version} of this tenant was made by a concurrent change"
            )
        return material

    def keyring(self, s: Session, tenant_id: str, *, for_update: bool = False) -> TenantKeyring:
        """The tenant's keyring; ``NotFoundError`` before its first key, refused if shredded."""
        ring = self._read_keyring(s, tenant_id, for_update=for_update)
        if ring is None:
            raise NotFoundError("no keys for this tenant yet")
        if ring.shredded_at is not None:
            raise TenantKeysShreddedError()
        return ring

    def keyring_for_shredding(self, s: Session, tenant_id: str) -> TenantKeyring:
        """The tenant's keyring, locked, shredded or not; made empty (version 0) if it has
        none, so that a tenant's first keys made at the same moment wait for the shredding
        and then find it shredded instead of colliding with it."""
        now = self._clock.now()
        s.execute(
            self._insert(_KEYRINGS).values(
                id=tenant_id, tenant_id=tenant_id, current_version=0, min_decryption_version=0,
                created_at=now, updated_at=now,
            ).on_conflict_do_nothing()
        )
        ring = self._read_keyring(s, tenant_id, for_update=True)
        if ring is None:
            raise AssertionError("the keyring row was just inserted or found")
        return ring

    def _read_keyring(self, s: Session, tenant_id: str, *, for_update: bool
                      ) -> TenantKeyring | None:
        stmt = select(TenantKeyring).where(TenantKeyring.id == tenant_id)
        if for_update:
            stmt = stmt.with_for_update()
            if not self._db.is_postgres:
                # SQLite has no row locks: a write first takes its writer lock (held until
                # the commit), so the read below is current and no other writer changes the
                # keyring before this transaction ends.
                s.execute(
                    update(_KEYRINGS).where(_KEYRINGS.c.id == tenant_id)
                    .values(updated_at=_KEYRINGS.c.updated_at)
                )
        return s.exec(stmt).first()

    def ensure_keyring(
        self, s: Session, tenant_id: str, actor: Principal | None, *, for_update: bool = False
    ) -> TenantKeyring:
        """The tenant's keyring, created (with KEK version 1, audited) on first use."""
        try:
            return self.keyring(s, tenant_id, for_update=for_update)
        except NotFoundError:
            return self._create_keyring(s, tenant_id, actor, for_update=for_update)

    def keyring_for_read(self, s: Session, tenant_id: str) -> TenantKeyring:
        """The keyring for opening data: a tenant without keys has nothing to decrypt."""
        try:
            return self.keyring(s, tenant_id)
        except NotFoundError:
            raise DecryptionFailedError() from None

    def writable_version(self, s: Session, tenant_id: str) -> int | None:
        """The current KEK version (None before the first key); refused once shredded."""
        ring = s.get(TenantKeyring, tenant_id)
        if ring is not None and ring.shredded_at is not None:
            raise TenantKeysShreddedError()
        return ring.current_version if ring is not None else None

    def kek(self, s: Session, tenant_id: str, version: int) -> bytes:
        """The unwrapped KEK ``version`` of the tenant (cached briefly)."""
        now = self._clock.now()
        cached = self._keks.get((tenant_id, version), now)
        if cached is not None:
            return cached
        row = s.exec(
            select(KeyEncryptionKey).where(
                KeyEncryptionKey.tenant_id == tenant_id, KeyEncryptionKey.version == version
            )
        ).first()
        if row is None:
            # Shredded since the caller read the keyring: say so, not "tampered".
            if self._shredded_now(tenant_id):
                raise TenantKeysShreddedError()
            raise DecryptionFailedError()
        provider = self.provider
        if row.provider_id != provider.provider_id:
            raise KeyProviderMismatchError(
                f"key version {version} was wrapped by {row.provider_id}, "
                f"the configured provider is {provider.provider_id}"
            )
        aad = kek_aad(tenant_id, version)
        try:
            if is_tenant_wrapped(row.wrapped_key):
                material = self.tenant_keys.unwrap(tenant_id, row.wrapped_key, aad)
            else:
                # Written before per-tenant keys existed: wrapped by the root key alone.  Move
                # it under the tenant key now (committed with the caller's transaction).
                material = provider.unwrap(row.wrapped_key, aad)
                row.wrapped_key = self.tenant_keys.wrap(
                    tenant_id, material, aad, create=self._may_create_tenant_key(s, tenant_id)
                )
                s.add(row)
        except TenantKeyMissingError:
            # Shredding commits, then destroys the tenant key: a caller that read the KEK row
            # just before that commit finds the key gone.  The keyring, read afresh, tells
            # that from a key lost without a shredding.
            if self._shredded_now(tenant_id):
                raise TenantKeysShreddedError() from None
            raise
        self._keks.put((tenant_id, version), material, now)
        return material

    def _shredded_now(self, tenant_id: str) -> bool:
        # In a session of its own: the caller's may hold the keyring as it was before the
        # shredding (its identity map, or its transaction's snapshot).
        with self._db.session() as fresh:
            ring = fresh.get(TenantKeyring, tenant_id)
            return ring is not None and ring.shredded_at is not None

    @staticmethod
    def _may_create_tenant_key(s: Session, tenant_id: str) -> bool:
        """A tenant key may be made only while none of the tenant's KEKs depends on one: a
        lost key must fail closed, never be silently replaced by a new one."""
        rows = s.exec(
            select(KeyEncryptionKey.wrapped_key).where(KeyEncryptionKey.tenant_id == tenant_id)
        ).all()
        return not any(is_tenant_wrapped(w) for w in rows)

    def migrate_tenant_keys(self, tenant_id: str | None = None) -> int:
        """Re-wrap KEKs still wrapped by the root key alone under their tenant's own key.

        The migration step for data written before per-tenant keys (reads also do it on first
        use).  Returns how many KEKs moved; shredded tenants have none left to move.
        """
        moved = 0
        with self._db.session() as s:
            stmt = select(KeyEncryptionKey)
            if tenant_id is not None:
                stmt = stmt.where(KeyEncryptionKey.tenant_id == tenant_id)
            for row in s.exec(stmt).all():
                if not is_tenant_wrapped(row.wrapped_key):
                    self._keks.pop((row.tenant_id, row.version))
                    self.kek(s, row.tenant_id, row.version)
                    moved += 1
        return moved

    def check_key_provider(self) -> None:
        """Raise :class:`KeyProviderUnavailableError` unless the key provider can serve now.

        A root key that does not exist yet is fine only while nothing depends on it: once any
        tenant key or wrapped KEK exists, a missing root key is an outage, not a fresh start.
        """
        provider = self.provider
        if provider.has_root_key():
            provider.check()
            return
        if self.tenant_keys.count():
            raise KeyProviderUnavailableError("the root key is missing while tenant keys exist")
        try:
            with self._db.session() as s:
                existing = s.exec(select(func.count()).select_from(KeyEncryptionKey)).one()
        except (SQLAlchemyError, DatabaseUnavailableError):
            # No database, or no schema yet: the database's own check reports that; nothing
            # says keys depend on the root key.
            return
        if existing:
            raise KeyProviderUnavailableError("the root key is missing while wrapped keys exist")

    # ------------------------------------------------------------------ digest keys

    def tenant_digest_key(self, s: Session, tenant_id: str) -> bytes:
        """The tenant's digest key (derived from KEK version 1; gone once shredded)."""
        now = self._clock.now()
        cached = self._digest_keys.get(tenant_id, now)
        if cached is not None:
            return cached
        self.keyring(s, tenant_id)
        key = derive_digest_key(self.kek(s, tenant_id, 1), tenant_id)
        self._digest_keys.put(tenant_id, key, now)
        return key

    def digest_key(self, tenant_id: str) -> bytes:
        """The tenant's digest key, making the tenant's keys first if it has none yet.

        Raises ``tenant_keys_shredded`` for a shredded tenant and the key provider's 503 when
        it cannot be used: callers that store a digest fail closed.  Call it outside any
        open transaction (it may create the keyring in its own).
        """
        cached = self._digest_keys.get(tenant_id, self._clock.now())
        if cached is not None:
            return cached
        for attempt in range(2):
            try:
                with self._db.session() as s:
                    self.ensure_keyring(s, tenant_id, None)
                    return self.tenant_digest_key(s, tenant_id)
            except IntegrityError:
                # Another process created the keyring at the same moment: use theirs.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def params_hmac(self, tenant_id: str, params_hash: str) -> str:
        """The keyed digest of a params hash: what storage and the audit log hold instead."""
        return params_hmac(self.digest_key(tenant_id), params_hash)

    def params_hmac_in(self, session: Session | None, tenant_id: str, params_hash: str) -> str:
        """:meth:`params_hmac` inside the caller's transaction ``session`` (when given), so a
        tenant's first keys are made in it instead of a second, nested transaction."""
        if session is None:
            return self.params_hmac(tenant_id, params_hash)
        cached = self._digest_keys.get(tenant_id, self._clock.now())
        if cached is None:
            self.ensure_keyring(session, tenant_id, None)
            cached = self.tenant_digest_key(session, tenant_id)
        return params_hmac(cached, params_hash)

    def rotated(self, tenant_id: str, version: int, material: bytes) -> None:
        """After a rotation: new writes lease DEKs under ``version``, whose KEK is cached."""
        self.leases.discard_where(lambda k: k[0] == tenant_id)
        self._keks.put((tenant_id, version), material, self._clock.now())

    # ------------------------------------------------------------------ DEKs

    def _new_lease(self, tenant_id: str, session_id: str, actor: Principal | None) -> WriteLease:
        """Make, wrap and store a fresh DEK (committed before any record uses it)."""
        for attempt in range(2):
            try:
                with self._db.session() as s:
                    ring = self.ensure_keyring(s, tenant_id, actor)
                    version = ring.current_version
                    kek = self.kek(s, tenant_id, version)
                    key = DataKey.generate()
                    dek_id = key.dek_id.hex()
                    s.add(
                        DataEncryptionKey(
                            id=dek_id, tenant_id=tenant_id, session_id=session_id,
                            kek_version=version,
                            wrapped_key=wrap_secret(
                                kek, key.material, dek_aad(tenant_id, dek_id, version)
                            ),
                            created_at=self._clock.now(),
                        )
                    )
                break
            except IntegrityError:
                # Another process created the keyring at the same moment: use theirs.
                if attempt:
                    raise
        return WriteLease(key=key, kek_version=version, remaining=self.max_messages)

    def cached_lease(self, tenant_id: str, session_id: str) -> WriteLease | None:
        """The cached write lease of a session, if any (no database round trip)."""
        return self.leases.get((tenant_id, session_id), self._clock.now())

    def lease(
        self,
        tenant_id: str,
        session_id: str,
        actor: Principal | None = None,
        current_version: int | None = None,
        messages: int = 1,
    ) -> WriteLease:
        """A DEK to seal ``messages`` more messages with, reusing the cached one while allowed."""
        slot = (tenant_id, session_id)
        now = self._clock.now()
        lease = self.leases.get(slot, now)
        if lease is not None and (current_version is None or lease.kek_version == current_version):
            if lease.take(messages):
                return lease
        with self._lease_lock:
            lease = self.leases.get(slot, now)
            if (
                lease is None
                or (current_version is not None and lease.kek_version != current_version)
                or not lease.take(messages)
            ):
                lease = self._new_lease(tenant_id, session_id, actor)
                if not lease.take(messages):
                    raise ValueError("dek_max_messages is smaller than one record's seals")
                self.leases.put(slot, lease, now)
            return lease

    def data_key(self, s: Session, tenant_id: str, dek_id: str, ring: TenantKeyring) -> DataKey:
        """The unwrapped DEK ``dek_id``; refuses keys under retired KEK versions."""
        row = s.exec(
            select(DataEncryptionKey).where(
                DataEncryptionKey.id == dek_id, DataEncryptionKey.tenant_id == tenant_id
            )
        ).first()
        if row is None:
            raise DecryptionFailedError()
        if row.kek_version < ring.min_decryption_version:
            raise KeyVersionRetiredError(
                f"this record's key is wrapped by version {row.kek_version}, below the minimum "
                f"decryption version {ring.min_decryption_version}"
            )
        now = self._clock.now()
        slot = (tenant_id, dek_id, row.kek_version)
        cached = self._deks.get(slot, now)
        if cached is not None:
            return cached
        kek = self.kek(s, tenant_id, row.kek_version)
        material = unwrap_secret(kek, row.wrapped_key, dek_aad(tenant_id, dek_id, row.kek_version))
        key = DataKey.from_material(bytes.fromhex(dek_id), material)
        self._deks.put(slot, key, now)
        return key

    def forget_keys(self, tenant_id: str | None = None) -> None:
        """Drop cached keys (of one tenant, or all): the next use goes to the provider."""
        if tenant_id is None:
            self._keks.clear()
            self._deks.clear()
            self.leases.clear()
            self._digest_keys.clear()
            return
        self._digest_keys.pop(tenant_id)
        self._keks.discard_where(lambda k: k[0] == tenant_id)
        self._deks.discard_where(lambda k: k[0] == tenant_id)
        self.leases.discard_where(lambda k: k[0] == tenant_id)

    def close(self) -> None:
        """Forget every cached key."""
        self.forget_keys()
