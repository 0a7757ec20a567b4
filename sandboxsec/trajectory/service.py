"""Encrypted trajectory records and streams of agent sessions.

A record's metadata and data are sealed under a DEK of the tenant's key hierarchy
(:class:`~sandboxsec.crypto.hierarchy.KeyHierarchy`), bound to tenant, session, record id,
part and kind (:func:`~sandboxsec.trajectory.format.record_context`).  Large records and data
of unknown length are written in the streaming format, segment by segment, in constant memory.

Fail closed: a root key that cannot be used, a database or an audit log that cannot be
written makes the read or write fail (503) before anything is returned or stored.  Every
write and every read is audited in the same transaction as the change it records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from sqlmodel import Session

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.crypto.envelope import open_sealed, parse_header, seal
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryRecordTooLargeError,
)
from sandboxsec.crypto.hierarchy import KeyHierarchy
from sandboxsec.crypto.models import TenantKeyring
from sandboxsec.crypto.stream import open_stream, read_stream_header, seal_stream
from sandboxsec.errors import SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.principal import Principal
from sandboxsec.storage.db import Database
from sandboxsec.trajectory import store
from sandboxsec.trajectory.config import TrajectoryConfig
from sandboxsec.trajectory.format import check_kind, record_context
from sandboxsec.trajectory.models import TrajectoryRecord
from sandboxsec.trajectory.views import RecordView, StoredRecord

__all__ = ["TrajectoryService"]


class TrajectoryService:
    """Stores and reads encrypted trajectory records of the tenants' sessions."""

    def __init__(self, db: Database, clock: Clock, audit: AuditSink, keys: KeyHierarchy,
                 config: TrajectoryConfig) -> None:
        self._db = db
        self._clock = clock
        self._audit = audit
        self._keys = keys
        self._config = config

    def seal(self, tenant_id: str, session_id: str, record_id: str, kind: str,
             data: bytes | memoryview) -> bytes | bytearray:
        """Seal one record's data in process (cached DEK; no database round trip when warm)."""
        lease = self._keys.cached_lease(tenant_id, session_id)
        if lease is None or not lease.take():
            lease = self._keys.lease(tenant_id, session_id)
        return seal(lease.key, data, record_context(tenant_id, session_id, record_id, "data", kind))

    def open(self, tenant_id: str, session_id: str, record_id: str, kind: str,
             blob: bytes | bytearray | memoryview) -> bytes:
        """Open what :meth:`seal` made (checks retirement and shredding in the database)."""
        dek_id = parse_header(blob).dek_id.hex()
        with self._db.session() as s:
            ring = self._keys.keyring_for_read(s, tenant_id)
            key = self._keys.data_key(s, tenant_id, dek_id, ring)
        ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        return open_sealed(key, blob, ctx)

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
        now = self._clock.now()
        current = self._writable(tenant_id, session_id, now)
        streamed = len(data) > self._config.stream_threshold_bytes
        # The metadata and a sealed record each use one random nonce under the DEK; a stream
        # derives its own key from a fresh salt and uses none.
        lease = self._keys.lease(tenant_id, session_id, who, current, messages=1 if streamed else 2)
        record_id = new_id("tr")
        digest = hashlib.sha256(data).hexdigest()
        meta_ctx = record_context(tenant_id, session_id, record_id, "meta", kind)
        meta_sealed = bytes(seal(lease.key, meta_raw, meta_ctx))
        data_ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        segments: Iterator[bytes] = iter(())
        segment_count = 0
        if streamed:
            layout = "stream"
            segments = seal_stream(lease.key, (data,), data_ctx,
                                   segment_bytes=self._config.stream_segment_bytes)
            body = next(segments)
            segment_count = len(data) // self._config.stream_segment_bytes + 1
        else:
            layout = "sealed"
            body = bytes(seal(lease.key, data, data_ctx))
        row = TrajectoryRecord(
            id=record_id, tenant_id=tenant_id, session_id=session_id, created_at=now,
            created_by=who.key_id, kind=kind, size=len(data), content_sha256=digest,
            dek_id=lease.key.dek_id.hex(), layout=layout, segment_count=segment_count,
            meta_sealed=meta_sealed, data=body,
        )
        with self._db.session() as s:
            s.add(row)
            s.flush()
            # Segments are sealed and sent one at a time: never all ciphertext in memory.
            for seq, segment in enumerate(segments):
                store.add_segment(s, tenant_id, record_id, seq, segment)
            s.flush()
            self._audit.append(
                AuditRecord(
                    event=AuditEvent.TRAJECTORY_WRITE, tenant_id=tenant_id,
                    actor_key_id=who.key_id, actor_role=str(who.role), outcome="success",
                    object_ids={"session_id": session_id, "record_id": record_id},
                    body={"kind": kind, "size": len(data), "content_sha256": digest,
                          "layout": layout, "kek_version": lease.kek_version},
                ),
                session=s,
            )
        return StoredRecord(record_id, session_id, kind, len(data), digest, now, layout)

    def _writable(self, tenant_id: str, session_id: str, now: datetime) -> int | None:
        """Check the session is the tenant's and open, and the keys not shredded; returns
        the tenant's current KEK version (None before its first key)."""
        with self._db.session() as s:
            store.open_session(s, tenant_id, session_id, now)
            return self._keys.writable_version(s, tenant_id)

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
        now = self._clock.now()
        current = self._writable(tenant_id, session_id, now)
        lease = self._keys.lease(tenant_id, session_id, who, current, messages=1)
        record_id = new_id("tr")
        meta_sealed = bytes(
            seal(lease.key, meta_raw, record_context(tenant_id, session_id, record_id, "meta",
                                                     kind))
        )
        hasher = hashlib.sha256()
        size = 0
        limit = self._config.max_record_bytes - len(meta_raw)

        def counted() -> Iterator[bytes | bytearray | memoryview]:
            nonlocal size
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise TrajectoryRecordTooLargeError(
                        f"the record passed the limit of {self._config.max_record_bytes} bytes"
                    )
                hasher.update(chunk)
                yield chunk

        data_ctx = record_context(tenant_id, session_id, record_id, "data", kind)
        segments = seal_stream(lease.key, counted(), data_ctx,
                               segment_bytes=self._config.stream_segment_bytes)
        header = next(segments)
        try:
            with self._db.session() as s:
                seq = -1
                for seq, segment in enumerate(segments):
                    store.add_segment(s, tenant_id, record_id, seq, segment)
                digest = hasher.hexdigest()
                s.add(TrajectoryRecord(
                    id=record_id, tenant_id=tenant_id, session_id=session_id, created_at=now,
                    created_by=who.key_id, kind=kind, size=size, content_sha256=digest,
                    dek_id=lease.key.dek_id.hex(), layout="stream", segment_count=seq + 1,
                    meta_sealed=meta_sealed, data=header,
                ))
                s.flush()
                self._audit.append(
                    AuditRecord(
                        event=AuditEvent.TRAJECTORY_WRITE, tenant_id=tenant_id,
                        actor_key_id=who.key_id, actor_role=str(who.role), outcome="success",
                        object_ids={"session_id": session_id, "record_id": record_id},
                        body={"kind": kind, "size": size, "content_sha256": digest,
                              "layout": "stream", "kek_version": lease.kek_version},
                    ),
                    session=s,
                )
        except TrajectoryRecordTooLargeError:
            self._refuse(who, session_id, TrajectoryRecordTooLargeError.code,
                         {"kind": kind, "size": size})
            raise
        return StoredRecord(record_id, session_id, kind, size, digest, now, "stream")

    def check_size(self, who: Principal, session_id: str, kind: str, size: int) -> None:
        """Refuse (audited, nothing stored) a record of ``size`` bytes above the limit."""
        if size > self._config.max_record_bytes:
            self._refuse(who, session_id, TrajectoryRecordTooLargeError.code,
                         {"kind": kind, "size": size})
            raise TrajectoryRecordTooLargeError(
                f"the record is {size} bytes; the limit is {self._config.max_record_bytes} bytes"
            )

    def _refuse(self, who: Principal, session_id: str, reason: str, body: dict[str, Any]) -> None:
        self._audit.append(
            AuditRecord(
                event=AuditEvent.TRAJECTORY_REFUSE, tenant_id=who.tenant_id,
                actor_key_id=who.key_id, actor_role=str(who.role), outcome="denied",
                reason=reason, object_ids={"session_id": session_id}, body=body,
            )
        )

    def _decrypt(self, s: Session, row: TrajectoryRecord, ring: TenantKeyring,
                 segments: list[bytes]) -> tuple[dict[str, Any], bytes]:
        key = self._keys.data_key(s, row.tenant_id, row.dek_id, ring)
        t, sid, rid, kind = row.tenant_id, row.session_id, row.id, row.kind
        meta_raw = open_sealed(key, row.meta_sealed, record_context(t, sid, rid, "meta", kind))
        data_ctx = record_context(t, sid, rid, "data", kind)
        if row.layout == "stream":
            data = b"".join(open_stream(lambda _id: key, [row.data, *segments], data_ctx))
        else:
            data = open_sealed(key, row.data, data_ctx)
        # The clear metadata is checked against the authenticated plaintext.
        if len(data) != row.size or hashlib.sha256(data).hexdigest() != row.content_sha256:
            raise DecryptionFailedError()
        meta = json.loads(meta_raw)
        return (meta if isinstance(meta, dict) else {}), data

    def _audit_read(self, s: Session | None, who: Principal, row: TrajectoryRecord,
                    outcome: str = "success", reason: str | None = None) -> None:
        self._audit.append(
            AuditRecord(
                event=AuditEvent.TRAJECTORY_READ, tenant_id=who.tenant_id,
                actor_key_id=who.key_id, actor_role=str(who.role), outcome=outcome,
                reason=reason, object_ids={"session_id": row.session_id, "record_id": row.id},
                body={"kind": row.kind, "size": row.size},
            ),
            session=s,
        )

    def _view(self, row: TrajectoryRecord, meta: dict[str, Any], data: bytes) -> RecordView:
        return RecordView(row.id, row.session_id, row.kind, row.size, row.content_sha256,
                          row.created_at, row.created_by, meta, data)

    def read(self, who: Principal, session_id: str, record_id: str) -> RecordView:
        """Decrypt one record of this tenant; the read is audited before it is returned.

        A missing record, another tenant's or another session's is 404.  A decryption failure
        is audited as a failed read and raised as ``decryption_failed``.
        """
        with self._db.session() as s:
            row = store.record_in_session(s, who.tenant_id, session_id, record_id)
            segments = store.segments(s, row)
            failed: SandboxSecError | None = None
            try:
                ring = self._keys.keyring_for_read(s, who.tenant_id)
                meta, data = self._decrypt(s, row, ring, segments)
            except (DecryptionFailedError, KeyVersionRetiredError,
                    TenantKeysShreddedError) as exc:
                failed = exc
        if failed is not None:
            self._audit_failed_read(who, row, failed)
            raise failed
        with self._db.session() as s:
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
        with self._db.session() as s:
            rows = store.session_records(
                s, who.tenant_id, session_id, limit=limit, after=after,
                kind=check_kind(kind) if kind is not None else None,
            )
            if not rows:
                return []
            ring = self._keys.keyring_for_read(s, who.tenant_id)
            views: list[RecordView] = []
            failed: SandboxSecError | None
            for row in rows:
                try:
                    meta, data = self._decrypt(s, row, ring, store.segments(s, row))
                except (DecryptionFailedError, KeyVersionRetiredError) as exc:
                    failed = exc
                    break
                views.append(self._view(row, meta, data))
            else:
                failed = None
        if failed is not None:
            self._audit_failed_read(who, row, failed)
            raise failed
        with self._db.session() as s:
            for row in rows:
                self._audit_read(s, who, row)
        return views

    def iter_data(self, who: Principal, session_id: str, record_id: str) -> Iterator[bytes]:
        """A record's plaintext segment by segment, reading one segment row at a time.

        The read is audited before the first byte is produced; an error part way through
        (a tampered segment) ends the iteration with ``decryption_failed``.
        """
        with self._db.session() as s:
            row = store.record_in_session(s, who.tenant_id, session_id, record_id)
            ring = self._keys.keyring_for_read(s, who.tenant_id)
            key = self._keys.data_key(s, who.tenant_id, row.dek_id, ring)
        with self._db.session() as s:
            self._audit_read(s, who, row)
        ctx = record_context(row.tenant_id, row.session_id, row.id, "data", row.kind)
        if row.layout != "stream":
            yield open_sealed(key, row.data, ctx)
            return
        read_stream_header(row.data)

        def ciphertext() -> Iterator[bytes]:
            yield row.data
            for seq in range(row.segment_count):
                with self._db.session() as s:
                    data = store.segment(s, row, seq)
                if data is None:
                    raise DecryptionFailedError()
                yield data

        hasher = hashlib.sha256()
        for part in open_stream(lambda _id: key, ciphertext(), ctx):
            hasher.update(part)
            yield part
        if hasher.hexdigest() != row.content_sha256:
            raise DecryptionFailedError()
