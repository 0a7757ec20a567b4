"""Encrypted trajectories and tenant keys: the adapter between the crypto core and the database.

Key hierarchy: the provider's root key wraps each tenant's versioned KEKs; the tenant's
current KEK wraps the data keys (DEKs); a DEK seals the records of one session (a fresh DEK
per process and session, at most ``dek_max_messages`` records each).

Fail closed: a root key that cannot be used, a database or an audit log that cannot be
written makes the read or write fail (503) before anything is returned or stored, and
nothing already stored is touched.  Every write, every read and every key change is audited
in the same transaction as the change it records.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.crypto.digests import ContentHasher, content_hmac, derive_digest_key, params_hmac
from sandboxsec.crypto.envelope import (
    KEY_BYTES,
    DataKey,
    encode_context,
    open_sealed,
    parse_header,
    seal,
    unwrap_secret,
    wrap_secret,
)
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderMismatchError,
    KeyProviderUnavailableError,
    KeyVersionInvalidError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryKindInvalidError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
    TrajectoryRecordTooLargeError,
    TrajectorySessionClosedError,
)
from sandboxsec.crypto.keyring import TtlCache, WriteLease
from sandboxsec.crypto.models import (
    DataEncryptionKey,
    KeyEncryptionKey,
    TenantKeyring,
    TrajectoryHead,
    TrajectoryRecord,
    TrajectorySegment,
)
from sandboxsec.crypto.order import (
    META_PART_V1,
    META_PART_V2,
    SeqRange,
    check_head,
    check_range,
    open_meta,
    seal_meta,
)
from sandboxsec.crypto.stream import open_stream, read_stream_header, seal_stream
from sandboxsec.crypto.tenant_keys import TenantKeyStore, build_tenant_key_store, is_tenant_wrapped
from sandboxsec.errors import NotFoundError, SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.sessions.models import AgentSession
from sandboxsec.storage.tenancy import get_scoped
from sandboxsec.tenants.models import Tenant

if TYPE_CHECKING:
    from sandboxsec.crypto.keys import KeyProvider
    from sandboxsec.services import Services

__all__ = [
    "KeyStatus",
    "KeyVersionInfo",
    "RecordView",
    "RewrapResult",
    "ShredResult",
    "StoredRecord",
    "TrajectoryService",
]

_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_CONTEXT_LABEL = "sandboxsec/trajectory/v1"
_REWRAP_BATCH = 500
_HEADS = TrajectoryHead.__table__  # type: ignore[attr-defined]
#: What a read that fails on stored data raises (audited as a failed read, then re-raised).
_READ_FAILURES = (
    DecryptionFailedError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
)


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """What a write returns: the new record's id and its clear metadata."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str
    created_at: datetime
    layout: str
    #: The keyed digest that is stored and audited (see :mod:`sandboxsec.crypto.digests`).
    content_hmac: str = ""
    #: Position in the session (authenticated; see :mod:`sandboxsec.crypto.order`).
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class RecordView:
    """A decrypted record."""

    record_id: str
    session_id: str
    kind: str
    size: int
    content_sha256: str
    created_at: datetime
    created_by: str
    meta: dict[str, Any]
    data: bytes
    content_hmac: str = ""
    seq: int | None = None


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


@functools.lru_cache(maxsize=4096)
def _context_prefix(tenant_id: str, session_id: str, part: str, kind: str) -> bytes:
    return encode_context(_CONTEXT_LABEL, tenant_id, session_id, part, kind)


def record_context(tenant_id: str, session_id: str, record_id: str, part: str, kind: str) -> bytes:
    """The associated data binding a ciphertext to its tenant, session, part, kind and record:
    ``encode_context(label, tenant, session, part, kind, record)`` (the prefix is cached)."""
    raw = record_id.encode()
    return _context_prefix(tenant_id, session_id, part, kind) + len(raw).to_bytes(4, "big") + raw


def _kek_aad(tenant_id: str, version: int) -> bytes:
    return encode_context("sandboxsec/kek/v1", tenant_id, str(version))


def _dek_aad(tenant_id: str, dek_id: str, kek_version: int) -> bytes:
    return encode_context("sandboxsec/dek/v1", tenant_id, dek_id, str(kek_version))


def _actor(actor: Principal | None) -> tuple[str | None, str]:
    if actor is None:
        return None, "operator"
    return actor.key_id, str(actor.role)


def check_kind(kind: str) -> str:
    """Validate a record kind (it is stored in clear and bound into the ciphertext)."""
    if not _KIND.match(kind):
        raise TrajectoryKindInvalidError()
    return kind


#: Every live service, so a forked child drops the parent's write leases (see ``_after_fork``).
_LIVE: weakref.WeakSet[TrajectoryService] = weakref.WeakSet()


def _after_fork() -> None:
    # Parent and child must not both seal under one DEK: its message bound would not hold.
    for service in list(_LIVE):
        service._leases.clear()


os.register_at_fork(after_in_child=_after_fork)


class TrajectoryService:
    """Stores and reads encrypted trajectory records; manages the tenants' keys."""

    def __init__(self, services: Services) -> None:
        _LIVE.add(self)
        self._s = services
        settings = services.settings
        ttl = float(settings.key_cache_ttl_seconds)
        size = int(settings.key_cache_max_entries)
        self._keks: TtlCache[tuple[str, int], bytes] = TtlCache(size, ttl)
        self._deks: TtlCache[tuple[str, str, int], DataKey] = TtlCache(size, ttl)
        self._leases: TtlCache[tuple[str, str], WriteLease] = TtlCache(size, ttl)
        self._digest_keys: TtlCache[str, bytes] = TtlCache(size, ttl)
        self._lease_lock = threading.Lock()
        self._max_messages = int(settings.dek_max_messages)
        self._max_record = int(settings.max_record_bytes)
        self._stream_threshold = int(settings.stream_threshold_bytes)
        self._segment_bytes = int(settings.stream_segment_bytes)
        self._tenant_key_store: TenantKeyStore | None = None

    # ------------------------------------------------------------------ key hierarchy

    @property
    def _provider(self) -> KeyProvider:
        return self._s.keys

    @property
    def tenant_keys(self) -> TenantKeyStore:
        """The per-tenant keys held by the key provider (what shredding destroys)."""
        if self._tenant_key_store is None:
            self._tenant_key_store = build_tenant_key_store(self._s.settings, self._provider)
        return self._tenant_key_store

    def check_key_provider(self) -> None:
        """Raise :class:`KeyProviderUnavailableError` unless the key provider can serve now.

        A root key that does not exist yet is fine only while nothing depends on it: once any
        tenant key or wrapped KEK exists, a missing root key is an outage, not a fresh start.
        """
        provider = self._provider
        if provider.has_root_key():
            provider.check()
            return
        if self.tenant_keys.count():
            raise KeyProviderUnavailableError("the root key is missing while tenant keys exist")
        with self._s.db.session() as s:
            existing = s.exec(select(func.count()).select_from(KeyEncryptionKey)).one()
        if existing:
            raise KeyProviderUnavailableError("the root key is missing while wrapped keys exist")

    def _create_keyring(self, s: Session, tenant_id: str, actor: Principal | None) -> TenantKeyring:
        now = self._s.clock.now()
        ring = TenantKeyring(
            id=tenant_id, tenant_id=tenant_id, current_version=1, min_decryption_version=1,
            created_at=now, updated_at=now,
        )
        self._add_kek(s, tenant_id, 1, now)
        s.add(ring)
        key_id, role = _actor(actor)
        self._s.audit.append(
            AuditRecord(
                event=AuditEvent.KEY_CREATE, tenant_id=tenant_id, actor_key_id=key_id,
                actor_role=role, outcome="success", object_ids={"tenant_id": tenant_id},
                body={"version": 1, "provider": self._provider.provider_id},
            ),
            session=s,
        )
        s.flush()
        return ring

    def _add_kek(self, s: Session, tenant_id: str, version: int, now: datetime) -> bytes:
        provider = self._provider
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
        wrapped = self.tenant_keys.wrap(tenant_id, material, _kek_aad(tenant_id, version),
                                        create=self._may_create_tenant_key(s, tenant_id))
        s.add(
            KeyEncryptionKey(
                id=new_id("kek"), tenant_id=tenant_id, version=version,
                provider_id=provider.provider_id, wrapped_key=wrapped, created_at=now,
            )
        )
        return material

    def _keyring(self, s: Session, tenant_id: str, *, for_update: bool = False) -> TenantKeyring:
        stmt = select(TenantKeyring).where(TenantKeyring.id == tenant_id)
        if for_update:
            stmt = stmt.with_for_update()
        ring = s.exec(stmt).first()
        if ring is None:
            raise NotFoundError("no keys for this tenant yet")
        if ring.shredded_at is not None:
            raise TenantKeysShreddedError()
        return ring

    def _ensure_keyring(
        self, s: Session, tenant_id: str, actor: Principal | None, *, for_update: bool = False
    ) -> TenantKeyring:
        try:
            return self._keyring(s, tenant_id, for_update=for_update)
        except NotFoundError:
            return self._create_keyring(s, tenant_id, actor)

    def _kek(self, s: Session, tenant_id: str, version: int) -> bytes:
        """The unwrapped KEK ``version`` of the tenant (cached briefly)."""
        now = self._s.clock.now()
        cached = self._keks.get((tenant_id, version), now)
        if cached is not None:
            return cached
        row = s.exec(
            select(KeyEncryptionKey).where(
                KeyEncryptionKey.tenant_id == tenant_id, KeyEncryptionKey.version == version
            )
        ).first()
        if row is None:
            raise DecryptionFailedError()
        provider = self._provider
        if row.provider_id != provider.provider_id:
            raise KeyProviderMismatchError(
                f"key version {version} was wrapped by {row.provider_id}, "
                f"the configured provider is {provider.provider_id}"
            )
        aad = _kek_aad(tenant_id, version)
        if is_tenant_wrapped(row.wrapped_key):
            material = self.tenant_keys.unwrap(tenant_id, row.wrapped_key, aad)
        else:
            # Written before per-tenant keys existed: wrapped by the root key alone.  Move it
            # under the tenant key now (committed with the caller's transaction).
            material = provider.unwrap(row.wrapped_key, aad)
            row.wrapped_key = self.tenant_keys.wrap(
                tenant_id, material, aad, create=self._may_create_tenant_key(s, tenant_id)
            )
            s.add(row)
        self._keks.put((tenant_id, version), material, now)
        return material

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
        with self._s.db.session() as s:
            stmt = select(KeyEncryptionKey)
            if tenant_id is not None:
                stmt = stmt.where(KeyEncryptionKey.tenant_id == tenant_id)
            for row in s.exec(stmt).all():
                if not is_tenant_wrapped(row.wrapped_key):
                    self._keks.pop((row.tenant_id, row.version))
                    self._kek(s, row.tenant_id, row.version)
                    moved += 1
        return moved

    def _new_lease(self, tenant_id: str, session_id: str, actor: Principal | None) -> WriteLease:
        """Make, wrap and store a fresh DEK (committed before any record uses it)."""
        for attempt in range(2):
            try:
                with self._s.db.session() as s:
                    ring = self._ensure_keyring(s, tenant_id, actor)
                    version = ring.current_version
                    kek = self._kek(s, tenant_id, version)
                    key = DataKey.generate()
                    dek_id = key.dek_id.hex()
                    s.add(
                        DataEncryptionKey(
                            id=dek_id, tenant_id=tenant_id, session_id=session_id,
                            kek_version=version,
                            wrapped_key=wrap_secret(
                                kek, key.material, _dek_aad(tenant_id, dek_id, version)
                            ),
                            created_at=self._s.clock.now(),
                        )
                    )
                break
            except IntegrityError:
                # Another process created the keyring at the same moment: use theirs.
                if attempt:
                    raise
        return WriteLease(key=key, kek_version=version, remaining=self._max_messages)

    def _lease(
        self,
        tenant_id: str,
        session_id: str,
        actor: Principal | None = None,
        current_version: int | None = None,
        messages: int = 1,
    ) -> WriteLease:
        """A DEK to seal ``messages`` more messages with, reusing the cached one while allowed."""
        slot = (tenant_id, session_id)
        now = self._s.clock.now()
        lease = self._leases.get(slot, now)
        if lease is not None and (current_version is None or lease.kek_version == current_version):
            if lease.take(messages):
                return lease
        with self._lease_lock:
            lease = self._leases.get(slot, now)
            if (
                lease is None
                or (current_version is not None and lease.kek_version != current_version)
                or not lease.take(messages)
            ):
                lease = self._new_lease(tenant_id, session_id, actor)
                if not lease.take(messages):
                    raise ValueError("dek_max_messages is smaller than one record's seals")
                self._leases.put(slot, lease, now)
            return lease

    def _data_key(self, s: Session, tenant_id: str, dek_id: str, ring: TenantKeyring) -> DataKey:
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
        now = self._s.clock.now()
        slot = (tenant_id, dek_id, row.kek_version)
        cached = self._deks.get(slot, now)
        if cached is not None:
            return cached
        kek = self._kek(s, tenant_id, row.kek_version)
        material = unwrap_secret(kek, row.wrapped_key, _dek_aad(tenant_id, dek_id, row.kek_version))
        key = DataKey.from_material(bytes.fromhex(dek_id), material)
        self._deks.put(slot, key, now)
        return key

    def _digest_key(self, s: Session, tenant_id: str) -> bytes:
        """The tenant's digest key (derived from KEK version 1; gone once shredded)."""
        now = self._s.clock.now()
        cached = self._digest_keys.get(tenant_id, now)
        if cached is not None:
            return cached
        self._keyring(s, tenant_id)
        key = derive_digest_key(self._kek(s, tenant_id, 1), tenant_id)
        self._digest_keys.put(tenant_id, key, now)
        return key

    def digest_key(self, tenant_id: str) -> bytes:
        """The tenant's digest key, making the tenant's keys first if it has none yet.

        Raises ``tenant_keys_shredded`` for a shredded tenant and the key provider's 503 when
        it cannot be used: callers that store a digest fail closed.
        """
        cached = self._digest_keys.get(tenant_id, self._s.clock.now())
        if cached is not None:
            return cached
        for attempt in range(2):
            try:
                with self._s.db.session() as s:
                    self._ensure_keyring(s, tenant_id, None)
                    return self._digest_key(s, tenant_id)
            except IntegrityError:
                # Another process created the keyring at the same moment: use theirs.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def params_hmac(self, tenant_id: str, params_hash: str) -> str:
        """The keyed digest of a params hash: what the audit log stores instead of it."""
        return params_hmac(self.digest_key(tenant_id), params_hash)

    def forget_keys(self, tenant_id: str | None = None) -> None:
        """Drop cached keys (of one tenant, or all): the next use goes to the provider."""
        if tenant_id is None:
            self._keks.clear()
            self._deks.clear()
            self._leases.clear()
            self._digest_keys.clear()
            return
        self._digest_keys.pop(tenant_id)
        self._keks.discard_where(lambda k: k[0] == tenant_id)
        self._deks.discard_where(lambda k: k[0] == tenant_id)
        self._leases.discard_where(lambda k: k[0] == tenant_id)

    # ------------------------------------------------------------------ the seal path

    def seal(self, tenant_id: str, session_id: str, record_id: str, kind: str,
             data: bytes | memoryview) -> bytes | bytearray:
        """Seal one record's data in process (cached DEK; no database round trip when warm)."""
        lease = self._leases.get((tenant_id, session_id), self._s.clock.now())
        if lease is None or not lease.take():
            lease = self._lease(tenant_id, session_id)
        return seal(lease.key, data, record_context(tenant_id, session_id, record_id, "data", kind))

    def open(self, tenant_id: str, session_id: str, record_id: str, kind: str,
             blob: bytes | bytearray | memoryview) -> bytes:
        """Open what :meth:`seal` made (checks retirement and shredding in the database)."""
        dek_id = parse_header(blob).dek_id.hex()
        with self._s.db.session() as s:
            ring = self._keyring_for_read(s, tenant_id)
            key = self._data_key(s, tenant_id, dek_id, ring)
        ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        return open_sealed(key, blob, ctx)

    # ------------------------------------------------------------------ records

    @staticmethod
    def _next_seq(s: Session, tenant_id: str, session_id: str) -> int:
        """Take the session's next position; the head row stays locked until the commit, so
        positions are gap-free and a rolled-back write gives its position back."""
        conn = s.connection()
        fresh = {"session_id": session_id, "tenant_id": tenant_id, "next_seq": 0}
        ins = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
        conn.execute(ins(_HEADS).values(**fresh).on_conflict_do_nothing())
        taken = conn.execute(
            update(_HEADS)
            .where(_HEADS.c.session_id == session_id, _HEADS.c.tenant_id == tenant_id)
            .values(next_seq=_HEADS.c.next_seq + 1)
            .returning(_HEADS.c.next_seq)
        ).scalar_one()
        return int(taken) - 1

    def write(
        self,
        who: Principal,
        session_id: str,
        kind: str,
        data: bytes,
        meta: Mapping[str, Any] | None = None,
    ) -> StoredRecord:
        """Encrypt and store one record of ``session_id``; audited with the insert.

        1. kind valid, size within the limit (else refused, audited, nothing stored);
        2. the session exists for this tenant (404 otherwise) and is open;
        3. the tenant's keys exist and are not shredded; a DEK of the current KEK version;
        4. metadata and data sealed, bound to tenant, session, record id and kind;
        5. the row(s) and the ``TRAJECTORY_WRITE`` audit entry commit together.
        """
        tenant_id = who.tenant_id
        check_kind(kind)
        meta_raw = json.dumps(dict(meta or {}), sort_keys=True, separators=(",", ":")).encode()
        self.check_size(who, session_id, kind, len(data) + len(meta_raw))
        now = self._s.clock.now()
        current = self._writable(tenant_id, session_id, now)
        streamed = len(data) > self._stream_threshold
        # The metadata and a sealed record each use one random nonce under the DEK; a stream
        # derives its own key from a fresh salt and uses none.
        lease = self._lease(tenant_id, session_id, who, current, messages=1 if streamed else 2)
        record_id = new_id("tr")
        digest = content_hmac(self.digest_key(tenant_id), data)
        meta_ctx = record_context(tenant_id, session_id, record_id, META_PART_V2, kind)
        data_ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        segments: Iterator[bytes] = iter(())
        segment_count = 0
        if streamed:
            layout = "stream"
            segments = seal_stream(lease.key, (data,), data_ctx, segment_bytes=self._segment_bytes)
            body = next(segments)
            segment_count = len(data) // self._segment_bytes + 1
        else:
            layout = "sealed"
            body = bytes(seal(lease.key, data, data_ctx))
        with self._s.db.session() as s:
            seq = self._next_seq(s, tenant_id, session_id)
            meta_sealed = bytes(seal(lease.key, seal_meta(meta or {}, seq=seq, author=who.key_id),
                                     meta_ctx))
            row = TrajectoryRecord(
                id=record_id, tenant_id=tenant_id, session_id=session_id, created_at=now,
                created_by=who.key_id, kind=kind, size=len(data), content_sha256="",
                content_hmac=digest, seq=seq, dek_id=lease.key.dek_id.hex(), layout=layout,
                segment_count=segment_count, meta_sealed=meta_sealed, data=body,
            )
            s.add(row)
            s.flush()
            # Segments are sealed and sent one at a time: never all ciphertext in memory.
            for seq, segment in enumerate(segments):
                s.exec(
                    insert(TrajectorySegment).values(
                        id=f"{record_id}.{seq}", tenant_id=tenant_id, record_id=record_id,
                        seq=seq, data=segment,
                    )
                )
            s.flush()
            self._s.audit.append(
                AuditRecord(
                    event=AuditEvent.TRAJECTORY_WRITE, tenant_id=tenant_id,
                    actor_key_id=who.key_id, actor_role=str(who.role), outcome="success",
                    object_ids={"session_id": session_id, "record_id": record_id},
                    body={"kind": kind, "size": len(data), "content_hmac": digest, "seq": seq,
                          "layout": layout, "kek_version": lease.kek_version},
                ),
                session=s,
            )
        return StoredRecord(record_id, session_id, kind, len(data),
                            hashlib.sha256(data).hexdigest(), now, layout, digest, seq)

    def _writable(self, tenant_id: str, session_id: str, now: datetime) -> int | None:
        """Check the session is the tenant's and open, and the keys not shredded; returns
        the tenant's current KEK version (None before its first key)."""
        with self._s.db.session() as s:
            agent_session = get_scoped(s, AgentSession, tenant_id, session_id, what="session")
            if agent_session.ended_at is not None or agent_session.expires_at <= now:
                raise TrajectorySessionClosedError()
            ring = s.get(TenantKeyring, tenant_id)
            if ring is not None and ring.shredded_at is not None:
                raise TenantKeysShreddedError()
            return ring.current_version if ring is not None else None

    def write_stream(
        self,
        who: Principal,
        session_id: str,
        kind: str,
        chunks: Iterable[bytes | bytearray | memoryview],
        meta: Mapping[str, Any] | None = None,
    ) -> StoredRecord:
        """Like :meth:`write` for data of unknown length (a file, a recording in progress),
        always in the streaming format and in constant memory: each segment is sealed and
        sent to the database as it fills.  Passing the size limit part way refuses the record;
        the transaction rolls back and nothing is stored.
        """
        tenant_id = who.tenant_id
        check_kind(kind)
        meta_raw = json.dumps(dict(meta or {}), sort_keys=True, separators=(",", ":")).encode()
        self.check_size(who, session_id, kind, len(meta_raw))
        now = self._s.clock.now()
        current = self._writable(tenant_id, session_id, now)
        lease = self._lease(tenant_id, session_id, who, current, messages=1)
        record_id = new_id("tr")
        meta_ctx = record_context(tenant_id, session_id, record_id, META_PART_V2, kind)
        hasher = ContentHasher(self.digest_key(tenant_id))
        plain = hashlib.sha256()
        size = 0
        limit = self._max_record - len(meta_raw)

        def counted() -> Iterator[bytes | bytearray | memoryview]:
            nonlocal size
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TrajectoryRecordTooLargeError(
                        f"the record passed the limit of {self._max_record} bytes"
                    )
                hasher.update(chunk)
                plain.update(chunk)
                yield chunk

        data_ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        segments = seal_stream(lease.key, counted(), data_ctx, segment_bytes=self._segment_bytes)
        header = next(segments)
        try:
            with self._s.db.session() as s:
                seq = -1
                for seq, segment in enumerate(segments):
                    s.exec(
                        insert(TrajectorySegment).values(
                            id=f"{record_id}.{seq}", tenant_id=tenant_id, record_id=record_id,
                            seq=seq, data=segment,
                        )
                    )
                digest = hasher.hexdigest()
                # The position is taken last: the head row stays locked only until the commit.
                pos = self._next_seq(s, tenant_id, session_id)
                meta_sealed = bytes(seal(
                    lease.key, seal_meta(meta or {}, seq=pos, author=who.key_id), meta_ctx
                ))
                s.add(TrajectoryRecord(
                    id=record_id, tenant_id=tenant_id, session_id=session_id, created_at=now,
                    created_by=who.key_id, kind=kind, size=size, content_sha256="",
                    content_hmac=digest, seq=pos, dek_id=lease.key.dek_id.hex(),
                    layout="stream", segment_count=seq + 1, meta_sealed=meta_sealed, data=header,
                ))
                s.flush()
                self._s.audit.append(
                    AuditRecord(
                        event=AuditEvent.TRAJECTORY_WRITE, tenant_id=tenant_id,
                        actor_key_id=who.key_id, actor_role=str(who.role), outcome="success",
                        object_ids={"session_id": session_id, "record_id": record_id},
                        body={"kind": kind, "size": size, "content_hmac": digest, "seq": pos,
                              "layout": "stream", "kek_version": lease.kek_version},
                    ),
                    session=s,
                )
        except TrajectoryRecordTooLargeError:
            self._refuse(who, session_id, TrajectoryRecordTooLargeError.code,
                         {"kind": kind, "size": size})
            raise
        return StoredRecord(record_id, session_id, kind, size, plain.hexdigest(), now, "stream",
                            digest, pos)

    def check_size(self, who: Principal, session_id: str, kind: str, size: int) -> None:
        """Refuse (audited, nothing stored) a record of ``size`` bytes above the limit."""
        if size > self._max_record:
            self._refuse(who, session_id, TrajectoryRecordTooLargeError.code,
                         {"kind": kind, "size": size})
            raise TrajectoryRecordTooLargeError(
                f"the record is {size} bytes; the limit is {self._max_record} bytes"
            )

    def _refuse(self, who: Principal, session_id: str, reason: str, body: dict[str, Any]) -> None:
        self._s.audit.append(
            AuditRecord(
                event=AuditEvent.TRAJECTORY_REFUSE, tenant_id=who.tenant_id,
                actor_key_id=who.key_id, actor_role=str(who.role), outcome="denied",
                reason=reason, object_ids={"session_id": session_id}, body=body,
            )
        )

    def _keyring_for_read(self, s: Session, tenant_id: str) -> TenantKeyring:
        try:
            return self._keyring(s, tenant_id)
        except NotFoundError:
            raise DecryptionFailedError() from None

    def _decrypt(self, s: Session, row: TrajectoryRecord, ring: TenantKeyring,
                 segments: list[bytes]) -> tuple[dict[str, Any], bytes]:
        key = self._data_key(s, row.tenant_id, row.dek_id, ring)
        meta = self._open_meta(row, key)
        data_ctx = record_context(row.tenant_id, row.session_id, row.id, "data", row.kind)
        if row.layout == "stream":
            data = b"".join(open_stream(lambda _id: key, [row.data, *segments], data_ctx))
        else:
            data = open_sealed(key, row.data, data_ctx)
        # The clear metadata is checked against the authenticated plaintext.
        self._check_digest(row, content_hmac(self._digest_key(s, row.tenant_id), data)
                           if row.content_hmac else hashlib.sha256(data).hexdigest(), len(data))
        return meta, data

    @staticmethod
    def _check_digest(row: TrajectoryRecord, computed: str, size: int) -> None:
        """The plaintext matches the row's clear size and digest (keyed, or plain for records
        from before keyed digests)."""
        stored = row.content_hmac or row.content_sha256
        if size != row.size or not hmac.compare_digest(computed.encode(), stored.encode()):
            raise DecryptionFailedError()

    @staticmethod
    def _open_meta(row: TrajectoryRecord, key: DataKey) -> dict[str, Any]:
        """Decrypt the metadata; for ordered records check the sealed seq and author."""
        part = META_PART_V1 if row.seq is None else META_PART_V2
        ctx = record_context(row.tenant_id, row.session_id, row.id, part, row.kind)
        raw = open_sealed(key, row.meta_sealed, ctx)
        if row.seq is None:
            meta = json.loads(raw)
            return meta if isinstance(meta, dict) else {}
        return open_meta(raw, seq=row.seq, author=row.created_by)

    def _segments(self, s: Session, row: TrajectoryRecord) -> list[bytes]:
        if row.layout != "stream":
            return []
        rows = s.exec(
            select(TrajectorySegment)
            .where(TrajectorySegment.record_id == row.id,
                   TrajectorySegment.tenant_id == row.tenant_id)
            .order_by(col(TrajectorySegment.seq))
        ).all()
        return [r.data for r in rows]

    def _audit_read(self, s: Session | None, who: Principal, row: TrajectoryRecord,
                    outcome: str = "success", reason: str | None = None) -> None:
        self._s.audit.append(
            AuditRecord(
                event=AuditEvent.TRAJECTORY_READ, tenant_id=who.tenant_id,
                actor_key_id=who.key_id, actor_role=str(who.role), outcome=outcome,
                reason=reason, object_ids={"session_id": row.session_id, "record_id": row.id},
                body={"kind": row.kind, "size": row.size},
            ),
            session=s,
        )

    def _view(self, row: TrajectoryRecord, meta: dict[str, Any], data: bytes) -> RecordView:
        # The plain digest is computed from the plaintext being returned: never stored.
        return RecordView(row.id, row.session_id, row.kind, row.size,
                          hashlib.sha256(data).hexdigest(), row.created_at, row.created_by,
                          meta, data, row.content_hmac, row.seq)

    def read(self, who: Principal, session_id: str, record_id: str) -> RecordView:
        """Decrypt one record of this tenant; the read is audited before it is returned.

        A missing record, another tenant's or another session's is 404.  A decryption failure
        is audited as a failed read and raised as ``decryption_failed``.
        """
        with self._s.db.session() as s:
            row = get_scoped(s, TrajectoryRecord, who.tenant_id, record_id, what="record")
            if row.session_id != session_id:
                raise NotFoundError("no such record")
            segments = self._segments(s, row)
            failed: SandboxSecError | None = None
            try:
                ring = self._keyring_for_read(s, who.tenant_id)
                meta, data = self._decrypt(s, row, ring, segments)
            except _READ_FAILURES as exc:
                failed = exc
        if failed is not None:
            self._audit_failed_read(who, row, failed)
            raise failed
        with self._s.db.session() as s:
            self._audit_read(s, who, row)
        return self._view(row, meta, data)

    def _audit_failed_read(self, who: Principal, row: TrajectoryRecord,
                           exc: SandboxSecError) -> None:
        try:
            self._audit_read(None, who, row, outcome="failure", reason=exc.reason)
        except SandboxSecError:
            pass  # the read fails either way; the audit outage is reported by the audit log

    def list(self, who: Principal, session_id: str, *, limit: int = 100,
             after: str | None = None, kind: str | None = None) -> list[RecordView]:
        """Decrypt the session's records (of ``kind`` if given), oldest first, starting after
        record id ``after``; each record returned is audited as read."""
        with self._s.db.session() as s:
            get_scoped(s, AgentSession, who.tenant_id, session_id, what="session")
            stmt = select(TrajectoryRecord).where(
                TrajectoryRecord.tenant_id == who.tenant_id,
                TrajectoryRecord.session_id == session_id,
            )
            if kind is not None:
                stmt = stmt.where(TrajectoryRecord.kind == check_kind(kind))
            seq = col(TrajectoryRecord.seq)
            if after is not None:
                anchor = get_scoped(s, TrajectoryRecord, who.tenant_id, after, what="record")
                if anchor.seq is not None:
                    stmt = stmt.where(seq > anchor.seq)
                else:
                    # Records from before authenticated order come first, by time then id.
                    stmt = stmt.where(
                        seq.is_not(None)
                        | (col(TrajectoryRecord.created_at) > anchor.created_at)
                        | ((col(TrajectoryRecord.created_at) == anchor.created_at)
                           & (col(TrajectoryRecord.id) > anchor.id))
                    )
            rows = s.exec(
                stmt.order_by(seq.is_not(None), seq, col(TrajectoryRecord.created_at),
                              col(TrajectoryRecord.id))
                .limit(limit)
            ).all()
            failed: SandboxSecError | None = None
            bad: TrajectoryRecord | None = None
            views: list[RecordView] = []
            try:
                self._check_order(s, who.tenant_id, session_id, rows,
                                  reached_end=len(rows) < limit)
            except _READ_FAILURES as exc:
                failed = exc
            if failed is None and rows:
                ring = self._keyring_for_read(s, who.tenant_id)
                for row in rows:
                    try:
                        meta, data = self._decrypt(s, row, ring, self._segments(s, row))
                    except _READ_FAILURES as exc:
                        failed, bad = exc, row
                        break
                    views.append(self._view(row, meta, data))
        if failed is not None:
            if bad is not None:
                self._audit_failed_read(who, bad, failed)
            else:
                self._audit_failed_session_read(who, session_id, failed)
            raise failed
        if not rows:
            return []
        with self._s.db.session() as s:
            for row in rows:
                self._audit_read(s, who, row)
        return views

    @staticmethod
    def _check_order(s: Session, tenant_id: str, session_id: str,
                     rows: Sequence[TrajectoryRecord], *, reached_end: bool) -> None:
        """No position up to the newest one read is missing or doubled; at the end of the
        session, as many ordered records remain as its head says were written."""
        scope = (TrajectoryRecord.tenant_id == tenant_id,
                 TrajectoryRecord.session_id == session_id)
        seq = col(TrajectoryRecord.seq)
        seqs = [r.seq for r in rows if r.seq is not None]
        if seqs:
            upto = max(seqs)
            n, distinct, lowest = s.exec(
                select(func.count(seq), func.count(func.distinct(seq)), func.min(seq))
                .where(*scope, seq.is_not(None), seq <= upto)
            ).one()
            check_range(SeqRange(upto, int(n), int(distinct), lowest))
        if reached_end:
            # One statement: the head and the count come from the same snapshot.
            stored = (select(func.count(seq)).where(*scope, seq.is_not(None))
                      .scalar_subquery())
            found = s.exec(
                select(TrajectoryHead.next_seq, stored).where(
                    TrajectoryHead.session_id == session_id,
                    TrajectoryHead.tenant_id == tenant_id,
                )
            ).first()
            if found is not None:
                check_head(int(found[0]), int(found[1]))
            elif seqs:
                check_head(0, len(seqs))

    def _audit_failed_session_read(self, who: Principal, session_id: str,
                                   exc: SandboxSecError) -> None:
        try:
            self._s.audit.append(
                AuditRecord(
                    event=AuditEvent.TRAJECTORY_READ, tenant_id=who.tenant_id,
                    actor_key_id=who.key_id, actor_role=str(who.role), outcome="failure",
                    reason=exc.reason, object_ids={"session_id": session_id}, body={},
                )
            )
        except SandboxSecError:
            pass  # the read fails either way; the audit outage is reported by the audit log

    def iter_data(self, who: Principal, session_id: str, record_id: str) -> Iterator[bytes]:
        """A record's plaintext segment by segment, reading one segment row at a time.

        The read is audited before the first byte is produced; an error part way through
        (a tampered segment) ends the iteration with ``decryption_failed``.
        """
        with self._s.db.session() as s:
            row = get_scoped(s, TrajectoryRecord, who.tenant_id, record_id, what="record")
            if row.session_id != session_id:
                raise NotFoundError("no such record")
            failed: SandboxSecError | None = None
            try:
                ring = self._keyring_for_read(s, who.tenant_id)
                key = self._data_key(s, who.tenant_id, row.dek_id, ring)
                # Position and author are checked before any byte goes out.
                self._open_meta(row, key)
                dkey = self._digest_key(s, who.tenant_id) if row.content_hmac else b""
            except _READ_FAILURES as exc:
                failed = exc
        if failed is not None:
            self._audit_failed_read(who, row, failed)
            raise failed
        with self._s.db.session() as s:
            self._audit_read(s, who, row)
        ctx = record_context(row.tenant_id, row.session_id, row.id, "data", row.kind)
        hasher: ContentHasher | Any = ContentHasher(dkey) if dkey else hashlib.sha256()
        if row.layout != "stream":
            data = open_sealed(key, row.data, ctx)
            hasher.update(data)
            self._check_digest(row, hasher.hexdigest(), len(data))
            yield data
            return
        read_stream_header(row.data)

        def ciphertext() -> Iterator[bytes]:
            yield row.data
            for seq in range(row.segment_count):
                with self._s.db.session() as s:
                    seg = s.exec(
                        select(TrajectorySegment).where(
                            TrajectorySegment.record_id == row.id,
                            TrajectorySegment.tenant_id == row.tenant_id,
                            TrajectorySegment.seq == seq,
                        )
                    ).first()
                if seg is None:
                    raise DecryptionFailedError()
                yield seg.data

        size = 0
        for part in open_stream(lambda _id: key, ciphertext(), ctx):
            hasher.update(part)
            size += len(part)
            yield part
        self._check_digest(row, hasher.hexdigest(), size)

    # ------------------------------------------------------------------ key management

    def _live_tenant(self, s: Session, tenant_id: str) -> None:
        tenant = s.get(Tenant, tenant_id)
        if tenant is None or tenant.deleted_at is not None:
            raise NotFoundError("no such tenant")

    def status(self, tenant_id: str) -> KeyStatus:
        """The tenant's key versions, its minimum decryption version, shredding."""
        with self._s.db.session() as s:
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
            except IntegrityError:
                # A concurrent rotation took this version number (SQLite has no row locks).
                if attempt == 2:
                    raise
        now = self._s.clock.now()
        self._leases.discard_where(lambda k: k[0] == tenant_id)
        self._keks.put((tenant_id, version), material, now)
        if rewrap:
            self.rewrap(tenant_id, actor)
        return self.status(tenant_id)

    def _rotate_once(self, tenant_id: str, actor: Principal | None) -> tuple[int, bytes]:
        now = self._s.clock.now()
        with self._s.db.session() as s:
            self._live_tenant(s, tenant_id)
            ring = self._ensure_keyring(s, tenant_id, actor, for_update=True)
            version = ring.current_version + 1
            material = self._add_kek(s, tenant_id, version, now)
            ring.current_version = version
            ring.updated_at = now
            s.add(ring)
            key_id, role = _actor(actor)
            self._s.audit.append(
                AuditRecord(
                    event=AuditEvent.KEY_ROTATE, tenant_id=tenant_id, actor_key_id=key_id,
                    actor_role=role, outcome="success", object_ids={"tenant_id": tenant_id},
                    body={"version": version, "provider": self._provider.provider_id},
                ),
                session=s,
            )
        return version, material

    def rewrap(self, tenant_id: str, actor: Principal | None) -> RewrapResult:
        """Re-wrap data keys of older, still readable KEK versions under the current one.

        Runs in batches, each batch committed with its own audit entry; only wrapped keys
        change, never a record.  Keys below the minimum decryption version stay as they are.
        """
        total = 0
        key_id, role = _actor(actor)
        while True:
            now = self._s.clock.now()
            with self._s.db.session() as s:
                self._live_tenant(s, tenant_id)
                ring = self._keyring(s, tenant_id)
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
                    target = self._kek(s, tenant_id, target_version)
                    for row in rows:
                        old = self._kek(s, tenant_id, row.kek_version)
                        material = unwrap_secret(
                            old, row.wrapped_key, _dek_aad(tenant_id, row.id, row.kek_version)
                        )
                        row.wrapped_key = wrap_secret(
                            target, material, _dek_aad(tenant_id, row.id, target_version)
                        )
                        row.kek_version = target_version
                        row.rewrapped_at = now
                        s.add(row)
                    self._s.audit.append(
                        AuditRecord(
                            event=AuditEvent.KEY_REWRAP, tenant_id=tenant_id,
                            actor_key_id=key_id, actor_role=role, outcome="success",
                            object_ids={"tenant_id": tenant_id},
                            body={"version": target_version, "data_keys": len(rows)},
                        ),
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
        now = self._s.clock.now()
        with self._s.db.session() as s:
            self._live_tenant(s, tenant_id)
            ring = self._keyring(s, tenant_id, for_update=True)
            if not 1 <= min_version <= ring.current_version:
                raise KeyVersionInvalidError(
                    f"the minimum decryption version must be between 1 and the current "
                    f"version {ring.current_version}"
                )
            previous = ring.min_decryption_version
            ring.min_decryption_version = min_version
            ring.updated_at = now
            s.add(ring)
            key_id, role = _actor(actor)
            self._s.audit.append(
                AuditRecord(
                    event=AuditEvent.KEY_RETIRE, tenant_id=tenant_id, actor_key_id=key_id,
                    actor_role=role, outcome="success", object_ids={"tenant_id": tenant_id},
                    body={"min_decryption_version": min_version, "previous": previous},
                ),
                session=s,
            )
        return self.status(tenant_id)

    def shred_tenant(self, tenant_id: str, actor: Principal | None) -> ShredResult:
        """Crypto-shred a tenant: destroy its KEKs and wrapped DEKs; its data becomes unreadable.

        Irreversible.  The keyring stays, marked shredded, so no new key is ever made for the
        tenant.  The ``KEY_SHRED`` audit entry commits with the deletion.  Works whether or not
        the tenant row still exists (tenant deletion calls this).
        """
        now = self._s.clock.now()
        with self._s.db.session() as s:
            ring = s.exec(
                select(TenantKeyring).where(TenantKeyring.id == tenant_id).with_for_update()
            ).first()
            if ring is None:
                ring = TenantKeyring(id=tenant_id, tenant_id=tenant_id, current_version=0,
                                     min_decryption_version=0, created_at=now, updated_at=now)
            keks = s.exec(
                delete(KeyEncryptionKey).where(col(KeyEncryptionKey.tenant_id) == tenant_id)
            ).rowcount
            deks = s.exec(
                delete(DataEncryptionKey).where(col(DataEncryptionKey.tenant_id) == tenant_id)
            ).rowcount
            ring.shredded_at = ring.shredded_at or now
            ring.updated_at = now
            s.add(ring)
            key_id, role = _actor(actor)
            self._s.audit.append(
                AuditRecord(
                    event=AuditEvent.KEY_SHRED, tenant_id=tenant_id, actor_key_id=key_id,
                    actor_role=role, outcome="success", object_ids={"tenant_id": tenant_id},
                    body={"keks_destroyed": keks, "deks_destroyed": deks},
                ),
                session=s,
            )
            shredded_at = ring.shredded_at
        self.forget_keys(tenant_id)
        # After the commit: if this fails the keyring is already marked shredded (nothing
        # reads or writes the tenant's data any more) and running the deletion again
        # finishes it.  This is the step that makes copies of the database unreadable.
        destroyed = self.tenant_keys.destroy(tenant_id)
        return ShredResult(tenant_id, int(keks), int(deks), shredded_at, destroyed)

    def close(self) -> None:
        """Forget every cached key."""
        self.forget_keys()


