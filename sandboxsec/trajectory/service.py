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
import hmac
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlmodel import Session

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.sink import AuditSink
from sandboxsec.clock import Clock
from sandboxsec.crypto.digests import ContentHasher, content_hmac
from sandboxsec.crypto.envelope import DataKey, open_sealed, parse_header, seal
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
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
from sandboxsec.trajectory.order import (
    META_PART_V1,
    META_PART_V2,
    check_head,
    check_range,
    open_meta,
    seal_meta,
)
from sandboxsec.trajectory.views import RecordView, StoredRecord

__all__ = ["TrajectoryService"]

#: What a read that fails on stored data raises (audited as a failed read, then re-raised).
_READ_FAILURES = (
    DecryptionFailedError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
)


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
        claim: Callable[[Session], None] | None = None,
    ) -> StoredRecord:
        """Encrypt and store one record of ``session_id``; audited with the insert.

        ``claim`` runs last in the insert's transaction: the session proof's single-use mark
        (:meth:`sandboxsec.sessions.binding.SessionBinding.acting`), committed with the record.

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
        digest = content_hmac(self._keys.digest_key(tenant_id), data)
        meta_ctx = record_context(tenant_id, session_id, record_id, META_PART_V2, kind)
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
        with self._db.session() as s:
            seq = store.next_seq(s, tenant_id, session_id)
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
            for i, segment in enumerate(segments):
                store.add_segment(s, tenant_id, record_id, i, segment)
            s.flush()
            self._audit.append(
                AuditRecord(
                    event=AuditEvent.TRAJECTORY_WRITE, tenant_id=tenant_id,
                    actor_key_id=who.key_id, actor_role=str(who.role), outcome="success",
                    object_ids={"session_id": session_id, "record_id": record_id},
                    body={"kind": kind, "size": len(data), "content_hmac": digest, "seq": seq,
                          "layout": layout, "kek_version": lease.kek_version},
                ),
                session=s,
            )
            if claim is not None:
                claim(s)
        return StoredRecord(record_id, session_id, kind, len(data),
                            hashlib.sha256(data).hexdigest(), now, layout, digest, seq)

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
        meta_ctx = record_context(tenant_id, session_id, record_id, META_PART_V2, kind)
        hasher = ContentHasher(self._keys.digest_key(tenant_id))
        plain = hashlib.sha256()
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
                plain.update(chunk)
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
                # The position is taken last: the head row stays locked only until the commit.
                pos = store.next_seq(s, tenant_id, session_id)
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
                self._audit.append(
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
        meta = self._open_meta(row, key)
        data_ctx = record_context(row.tenant_id, row.session_id, row.id, "data", row.kind)
        if row.layout == "stream":
            data = b"".join(open_stream(lambda _id: key, [row.data, *segments], data_ctx))
        else:
            data = open_sealed(key, row.data, data_ctx)
        # The clear metadata is checked against the authenticated plaintext.
        self._check_digest(row, content_hmac(self._keys.tenant_digest_key(s, row.tenant_id), data)
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
        # The plain digest is computed from the plaintext being returned: never stored.
        return RecordView(row.id, row.session_id, row.kind, row.size,
                          hashlib.sha256(data).hexdigest(), row.created_at, row.created_by,
                          meta, data, row.content_hmac, row.seq)

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
            except _READ_FAILURES as exc:
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
            failed: SandboxSecError | None = None
            bad: TrajectoryRecord | None = None
            views: list[RecordView] = []
            try:
                self._check_order(s, who.tenant_id, session_id, rows,
                                  reached_end=len(rows) < limit)
            except _READ_FAILURES as exc:
                failed = exc
            if failed is None and rows:
                ring = self._keys.keyring_for_read(s, who.tenant_id)
                for row in rows:
                    try:
                        meta, data = self._decrypt(s, row, ring, store.segments(s, row))
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
        with self._db.session() as s:
            for row in rows:
                self._audit_read(s, who, row)
        return views

    @staticmethod
    def _check_order(s: Session, tenant_id: str, session_id: str,
                     rows: Sequence[TrajectoryRecord], *, reached_end: bool) -> None:
        """No position up to the newest one read is missing or doubled; at the end of the
        session, as many ordered records remain as its head says were written."""
        seqs = [r.seq for r in rows if r.seq is not None]
        if seqs:
            check_range(store.seq_range(s, tenant_id, session_id, max(seqs)))
        if reached_end:
            found = store.head_and_count(s, tenant_id, session_id)
            if found is not None:
                check_head(*found)
            elif seqs:
                check_head(0, len(seqs))

    def _audit_failed_session_read(self, who: Principal, session_id: str,
                                   exc: SandboxSecError) -> None:
        try:
            self._audit.append(
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
        with self._db.session() as s:
            row = store.record_in_session(s, who.tenant_id, session_id, record_id)
            failed: SandboxSecError | None = None
            try:
                ring = self._keys.keyring_for_read(s, who.tenant_id)
                key = self._keys.data_key(s, who.tenant_id, row.dek_id, ring)
                # Position and author are checked before any byte goes out.
                self._open_meta(row, key)
                dkey = self._keys.tenant_digest_key(s, who.tenant_id) if row.content_hmac else b""
            except _READ_FAILURES as exc:
                failed = exc
        if failed is not None:
            self._audit_failed_read(who, row, failed)
            raise failed
        with self._db.session() as s:
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
                with self._db.session() as s:
                    data = store.segment(s, row, seq)
                if data is None:
                    raise DecryptionFailedError()
                yield data

        size = 0
        for part in open_stream(lambda _id: key, ciphertext(), ctx):
            hasher.update(part)
            size += len(part)
            yield part
        self._check_digest(row, hasher.hexdigest(), size)
