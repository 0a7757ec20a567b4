"""Key administration: a tenant's key status, rotation, rewrap, retirement and crypto-shredding.

Every key change is audited in the same transaction as the change; the keys themselves are
the :class:`~sandboxsec.crypto.hierarchy.KeyHierarchy`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, delete, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.crypto.envelope import unwrap_secret, wrap_secret
from sandboxsec.crypto.errors import KeyVersionConflictError, KeyVersionInvalidError
from sandboxsec.crypto.hierarchy import KeyHierarchy, dek_aad, key_event
from sandboxsec.crypto.models import DataEncryptionKey, KeyEncryptionKey, TenantKeyring
from sandboxsec.errors import NotFoundError
from sandboxsec.principal import Principal
from sandboxsec.storage.db import Database
from sandboxsec.tenants.models import Tenant

__all__ = ["KeyAdmin", "KeyStatus", "KeyVersionInfo", "RewrapResult", "ShredResult"]

_REWRAP_BATCH = 500


@dataclass(frozen=True, slots=True)
class KeyVersionInfo:
    """One KEK version of a tenant and how many data keys it wraps."""

    version: int
    created_at: datetime
    provider_id: str
    data_keys: int


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """A tenant's key state."""

    tenant_id: str
    current_version: int
    min_decryption_version: int
    shredded_at: datetime | None
    versions: tuple[KeyVersionInfo, ...]


@dataclass(frozen=True, slots=True)
class RewrapResult:
    """Outcome of a rewrap: how many data keys moved to ``version``, how many stay retired."""

    version: int
    rewrapped: int
    skipped_retired: int


@dataclass(frozen=True, slots=True)
class ShredResult:
    """Outcome of crypto-shredding a tenant."""

    tenant_id: str
    keks_destroyed: int
    deks_destroyed: int
    shredded_at: datetime
    #: Whether the tenant's key in the key provider was destroyed by this call (False when an
    #: earlier call already did, or the tenant never had one).
    tenant_key_destroyed: bool = False


class KeyAdmin:
    """Administers the tenants' key hierarchy: status, rotate, rewrap, retire, shred."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink,
                 keys: KeyHierarchy) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit
        self._keys = keys

    def _live_tenant(self, s: Session, tenant_id: str) -> None:
        tenant = s.get(Tenant, tenant_id)
        if tenant is None or tenant.deleted_at is not None:
            raise NotFoundError("no such tenant")

    def status(self, tenant_id: str) -> KeyStatus:
        """The tenant's key versions, its minimum decryption version, shredding."""
        with self._db.session() as s:
            self._live_tenant(s, tenant_id)
            ring = s.get(TenantKeyring, tenant_id)
            if ring is None:
                return KeyStatus(tenant_id, 0, 0, None, ())
            keks = s.exec(
                select(KeyEncryptionKey).where(KeyEncryptionKey.tenant_id == tenant_id)
            ).all()
            counts = dict(
                s.exec(
                    select(DataEncryptionKey.kek_version, func.count())
                    .where(DataEncryptionKey.tenant_id == tenant_id)
                    .group_by(col(DataEncryptionKey.kek_version))
                ).all()
            )
        versions = tuple(
            KeyVersionInfo(k.version, k.created_at, k.provider_id, int(counts.get(k.version, 0)))
            for k in sorted(keks, key=lambda k: k.version)
        )
        return KeyStatus(tenant_id, ring.current_version, ring.min_decryption_version,
                         ring.shredded_at, versions)

    def rotate(self, tenant_id: str, actor: Principal | None, *,
               rewrap: bool = False) -> KeyStatus:
        """Make a new KEK version; new data keys use it, old data stays readable.

        With ``rewrap`` every readable data key is then re-wrapped under the new version
        (the record ciphertexts are not touched).
        """
        for attempt in range(3):
            try:
                version, material = self._rotate_once(tenant_id, actor)
                break
            except KeyVersionConflictError:
                # A concurrent change took this version number; the keyring lock makes that
                # unexpected, but a retry is the right answer to it.  The last one is a 409.
                if attempt == 2:
                    raise
        self._keys.rotated(tenant_id, version, material)
        if rewrap:
            self.rewrap(tenant_id, actor)
        return self.status(tenant_id)

    def _rotate_once(self, tenant_id: str, actor: Principal | None) -> tuple[int, bytes]:
        now = self._clock.now()
        with self._db.session() as s:
            self._live_tenant(s, tenant_id)
            ring = self._keys.ensure_keyring(s, tenant_id, actor, for_update=True)
            version = ring.current_version + 1
            material = self._keys.add_kek(s, tenant_id, version, now)
            ring.current_version = version
            ring.updated_at = now
            s.add(ring)
            self._audit.append(
                key_event(AuditEvent.KEY_ROTATE, tenant_id, actor,
                          {"version": version, "provider": self._keys.provider.provider_id}),
                session=s,
            )
        return version, material

    def rewrap(self, tenant_id: str, actor: Principal | None) -> RewrapResult:
        """Re-wrap data keys of older, still readable KEK versions under the current one.

        Runs in batches, each batch committed with its own audit entry; only wrapped keys
        change, never a record.  Keys below the minimum decryption version stay as they are.
        """
        total = 0
        while True:
            now = self._clock.now()
            with self._db.session() as s:
                self._live_tenant(s, tenant_id)
                ring = self._keys.keyring(s, tenant_id)
                target_version = ring.current_version
                rows = s.exec(
                    select(DataEncryptionKey)
                    .where(
                        DataEncryptionKey.tenant_id == tenant_id,
                        col(DataEncryptionKey.kek_version) < target_version,
                        col(DataEncryptionKey.kek_version) >= ring.min_decryption_version,
                    )
                    .limit(_REWRAP_BATCH)
                ).all()
                if rows:
                    target = self._keys.kek(s, tenant_id, target_version)
                    for row in rows:
                        old = self._keys.kek(s, tenant_id, row.kek_version)
                        material = unwrap_secret(
                            old, row.wrapped_key, dek_aad(tenant_id, row.id, row.kek_version)
                        )
                        row.wrapped_key = wrap_secret(
                            target, material, dek_aad(tenant_id, row.id, target_version)
                        )
                        row.kek_version = target_version
                        row.rewrapped_at = now
                        s.add(row)
                    self._audit.append(
                        key_event(AuditEvent.KEY_REWRAP, tenant_id, actor,
                                  {"version": target_version, "data_keys": len(rows)}),
                        session=s,
                    )
                    total += len(rows)
                else:
                    skipped = s.exec(
                        select(func.count())
                        .select_from(DataEncryptionKey)
                        .where(
                            DataEncryptionKey.tenant_id == tenant_id,
                            col(DataEncryptionKey.kek_version) < ring.min_decryption_version,
                        )
                    ).one()
            if not rows:
                return RewrapResult(target_version, total, int(skipped))

    def retire(self, tenant_id: str, actor: Principal | None, min_version: int) -> KeyStatus:
        """Set the minimum decryption version: data keys under older KEKs no longer open."""
        now = self._clock.now()
        with self._db.session() as s:
            self._live_tenant(s, tenant_id)
            ring = self._keys.keyring(s, tenant_id, for_update=True)
            if not 1 <= min_version <= ring.current_version:
                raise KeyVersionInvalidError(
                    f"the minimum decryption version must be between 1 and the current "
                    f"version {ring.current_version}"
                )
            previous = ring.min_decryption_version
            ring.min_decryption_version = min_version
            ring.updated_at = now
            s.add(ring)
            self._audit.append(
                key_event(AuditEvent.KEY_RETIRE, tenant_id, actor,
                          {"min_decryption_version": min_version, "previous": previous}),
                session=s,
            )
        return self.status(tenant_id)

    def shred_tenant(self, tenant_id: str, actor: Principal | None) -> ShredResult:
        """Crypto-shred a tenant: destroy its KEKs and wrapped DEKs; its data becomes unreadable.

        Irreversible.  The keyring stays, marked shredded, so no new key is ever made for the
        tenant.  The ``KEY_SHRED`` audit entry commits with the deletion.  Works whether or not
        the tenant row still exists (tenant deletion calls this).
        """
        now = self._clock.now()
        with self._db.session() as s:
            ring = self._keys.keyring_for_shredding(s, tenant_id)
            keks = s.exec(
                delete(KeyEncryptionKey).where(col(KeyEncryptionKey.tenant_id) == tenant_id)
            ).rowcount
            deks = s.exec(
                delete(DataEncryptionKey).where(col(DataEncryptionKey.tenant_id) == tenant_id)
            ).rowcount
            ring.shredded_at = ring.shredded_at or now
            ring.updated_at = now
            s.add(ring)
            self._audit.append(
                key_event(AuditEvent.KEY_SHRED, tenant_id, actor,
                          {"keks_destroyed": keks, "deks_destroyed": deks}),
                session=s,
            )
            shredded_at = ring.shredded_at
        self._keys.forget_keys(tenant_id)
        # After the commit: if this fails the keyring is already marked shredded (nothing
        # reads or writes the tenant's data any more) and running the deletion again
        # finishes it.  This is the step that makes copies of the database unreadable.
        destroyed = self._keys.tenant_keys.destroy(tenant_id)
        return ShredResult(tenant_id, int(keks), int(deks), shredded_at, destroyed)
