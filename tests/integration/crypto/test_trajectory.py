"""Encrypted trajectories end to end on SQLite and PostgreSQL: what an operator relies on."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from sqlalchemy import text, update
from sqlmodel import select

from sandboxsec.audit.models import AuditEntryRow
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderUnavailableError,
    KeyVersionInvalidError,
    KeyVersionRetiredError,
    TenantKeysShreddedError,
    TrajectoryKindInvalidError,
    TrajectoryRecordTooLargeError,
    TrajectorySessionClosedError,
)
from sandboxsec.crypto.models import DataEncryptionKey, KeyEncryptionKey
from sandboxsec.errors import NotFoundError, SandboxSecError
from sandboxsec.principal import Role
from sandboxsec.schema import metadata
from sandboxsec.services import Services
from sandboxsec.trajectory.models import TrajectoryRecord, TrajectorySegment
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import principal

MARKER = b"MARKER-7f3a9c-IBAN-DE89370400440532013000"
MakeSession = Callable[[str], str]


def _events(services: Services, tenant_id: str, event: str) -> int:
    with services.db.session() as s:
        rows = s.exec(
            select(AuditEntryRow).where(AuditEntryRow.tenant_id == tenant_id,
                                        AuditEntryRow.event == event)
        ).all()
    return len(rows)


def _row(services: Services, record_id: str) -> TrajectoryRecord:
    with services.db.session() as s:
        row = s.get(TrajectoryRecord, record_id)
    assert row is not None
    return row


def test_round_trip_small_and_streamed(services: Services, tenant: TenantKeys,
                                       make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    small = services.trajectory.write(agent, sid, "action", b"click pay", {"step": 1})
    services.clock.advance(1)  # type: ignore[attr-defined]
    big_data = os.urandom(10_000) + MARKER
    big = services.trajectory.write(agent, sid, "screenshot", big_data, {"w": 800})
    assert small.layout == "sealed" and big.layout == "stream"
    assert _row(services, big.record_id).segment_count == 10

    got = services.trajectory.read(admin, sid, small.record_id)
    assert (got.data, got.meta, got.kind) == (b"click pay", {"step": 1}, "action")
    got = services.trajectory.read(admin, sid, big.record_id)
    assert got.data == big_data and got.meta == {"w": 800}
    assert b"".join(services.trajectory.iter_data(admin, sid, big.record_id)) == big_data
    listed = services.trajectory.list(admin, sid)
    assert [v.record_id for v in listed] == [small.record_id, big.record_id]
    assert _events(services, tenant.id, "trajectory:record:write") == 2
    # one read, one read, one streamed read, two listed
    assert _events(services, tenant.id, "trajectory:record:read") == 5


def test_database_holds_no_plaintext(services: Services, tenant: TenantKeys,
                                     make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    agent = principal(tenant, Role.AGENT)
    services.trajectory.write(agent, sid, "observation", MARKER, {"note": MARKER.decode()})
    services.trajectory.write(agent, sid, "screenshot", MARKER * 200, {"n": MARKER.decode()})
    services.trajectory.read(principal(tenant, Role.ADMIN), sid,
                             services.trajectory.list(principal(tenant, Role.ADMIN), sid)[0]
                             .record_id)
    found = []
    with services.db.engine.connect() as conn:
        for table in metadata().sorted_tables:
            for row in conn.execute(table.select()):
                for value in row:
                    raw = value if isinstance(value, bytes | memoryview) else str(value).encode()
                    if MARKER in bytes(raw) or MARKER[:20] in bytes(raw):
                        found.append(table.name)
    assert found == []


def test_moved_ciphertext_fails(services: Services, tenant: TenantKeys,
                                other_tenant: TenantKeys, make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    a = services.trajectory.write(agent, sid, "action", b"pay 10 EUR to alice")
    b = services.trajectory.write(agent, sid, "action", b"pay 99 EUR to mallory")
    row_a = _row(services, a.record_id)
    # Record a's ciphertext copied into record b's row.
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == b.record_id)  # type: ignore[arg-type]
               .values(data=row_a.data, meta_sealed=row_a.meta_sealed,
                       size=row_a.size, content_sha256=row_a.content_sha256))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, b.record_id)
    # Record a moved into another tenant (row and session id rewritten).
    other_sid = make_session(other_tenant.id)
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == a.record_id)  # type: ignore[arg-type]
               .values(tenant_id=other_tenant.id, session_id=other_sid))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(principal(other_tenant, Role.ADMIN), other_sid, a.record_id)
    # ... even when its data key is moved along.
    with services.db.session() as s:
        s.exec(update(DataEncryptionKey).where(DataEncryptionKey.id == row_a.dek_id)  # type: ignore[arg-type]
               .values(tenant_id=other_tenant.id))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(principal(other_tenant, Role.ADMIN), other_sid, a.record_id)
    assert _events(services, other_tenant.id, "trajectory:record:read") == 2  # failures


def test_flipped_bit_truncation_and_reordering_fail(services: Services, tenant: TenantKeys,
                                                    make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    small = services.trajectory.write(agent, sid, "action", b"x" * 100)
    row = _row(services, small.record_id)
    flipped = bytearray(row.data)
    flipped[-20] ^= 0x01
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == small.record_id)  # type: ignore[arg-type]
               .values(data=bytes(flipped)))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, small.record_id)

    def streamed() -> str:
        return services.trajectory.write(agent, sid, "recording", os.urandom(5000)).record_id

    # Last segment dropped (segment count adjusted to match).
    rid = streamed()
    with services.db.session() as s:
        s.exec(text("DELETE FROM trajectory_segments WHERE record_id = :r AND seq = 4"),  # type: ignore[call-overload]
               params={"r": rid})
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == rid)  # type: ignore[arg-type]
               .values(segment_count=4))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, rid)
    with pytest.raises(DecryptionFailedError):
        b"".join(services.trajectory.iter_data(admin, sid, rid))
    # Two segments swapped.
    rid = streamed()
    with services.db.session() as s:
        segs = {g.seq: g for g in s.exec(
            select(TrajectorySegment).where(TrajectorySegment.record_id == rid)).all()}
        segs[1].data, segs[2].data = segs[2].data, segs[1].data
        s.add(segs[1])
        s.add(segs[2])
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, rid)
    # The clear size/hash edited: refused, the plaintext is checked against them.
    rid = streamed()
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == rid)  # type: ignore[arg-type]
               .values(content_sha256="0" * 64))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, rid)
    # The clear kind edited: the kind is bound into the ciphertext.
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(TrajectoryRecord.id == small.record_id)  # type: ignore[arg-type]
               .values(data=row.data, kind="observation"))
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(admin, sid, small.record_id)


def test_rotation_keeps_old_data_and_rewrap_moves_keys(services: Services, tenant: TenantKeys,
                                                       make_session: MakeSession) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    s1 = make_session(tenant.id)
    old = services.trajectory.write(agent, s1, "action", b"before rotation")
    status = services.key_admin.rotate(tenant.id, admin)
    assert status.current_version == 2
    # New data in the same session uses the new version at once.
    new = services.trajectory.write(agent, s1, "action", b"after rotation")
    assert _row(services, new.record_id).dek_id != _row(services, old.record_id).dek_id
    status = services.key_admin.status(tenant.id)
    assert [(v.version, v.data_keys) for v in status.versions] == [(1, 1), (2, 1)]
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(admin, s1, old.record_id).data == b"before rotation"

    before = _row(services, old.record_id)
    result = services.key_admin.rewrap(tenant.id, admin)
    assert (result.version, result.rewrapped, result.skipped_retired) == (2, 1, 0)
    after = _row(services, old.record_id)
    assert (after.data, after.meta_sealed) == (before.data, before.meta_sealed)  # untouched
    status = services.key_admin.status(tenant.id)
    assert [(v.version, v.data_keys) for v in status.versions] == [(1, 0), (2, 2)]
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(admin, s1, old.record_id).data == b"before rotation"
    assert _events(services, tenant.id, "keys:kek:rotate") == 1
    assert _events(services, tenant.id, "keys:dek:rewrap") == 1


def test_retire_refuses_old_versions(services: Services, tenant: TenantKeys,
                                     make_session: MakeSession) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    old = services.trajectory.write(agent, sid, "action", b"v1 data")
    services.key_admin.rotate(tenant.id, admin)
    with pytest.raises(KeyVersionInvalidError):
        services.key_admin.retire(tenant.id, admin, 3)
    services.key_admin.retire(tenant.id, admin, 2)
    with pytest.raises(KeyVersionRetiredError) as err:
        services.trajectory.read(admin, sid, old.record_id)
    assert err.value.reason == "key_version_retired"
    assert services.key_admin.rewrap(tenant.id, admin).skipped_retired == 1
    # Lowering the minimum again makes it readable (the version was retired, not destroyed).
    services.key_admin.retire(tenant.id, admin, 1)
    assert services.trajectory.read(admin, sid, old.record_id).data == b"v1 data"
    assert _events(services, tenant.id, "keys:kek:retire") == 2


def test_crypto_shredding(services: Services, tenant: TenantKeys, other_tenant: TenantKeys,
                          make_session: MakeSession) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid, other_sid = make_session(tenant.id), make_session(other_tenant.id)
    rec = services.trajectory.write(agent, sid, "action", MARKER)
    big = services.trajectory.write(agent, sid, "screenshot", os.urandom(9000))
    kept = services.trajectory.write(principal(other_tenant, Role.AGENT), other_sid, "action",
                                     b"other tenant's data")
    result = services.key_admin.shred_tenant(tenant.id, admin)
    assert (result.keks_destroyed, result.deks_destroyed) == (1, 1)
    for rid in (rec.record_id, big.record_id):
        with pytest.raises(TenantKeysShreddedError):
            services.trajectory.read(admin, sid, rid)
    with pytest.raises(TenantKeysShreddedError):
        services.trajectory.write(agent, sid, "action", b"more")
    with pytest.raises(TenantKeysShreddedError):
        services.key_admin.rotate(tenant.id, admin)
    with services.db.session() as s:
        assert s.exec(select(KeyEncryptionKey).where(
            KeyEncryptionKey.tenant_id == tenant.id)).all() == []
        assert s.exec(select(DataEncryptionKey).where(
            DataEncryptionKey.tenant_id == tenant.id)).all() == []
    assert _events(services, tenant.id, "keys:tenant:shred") == 1
    # Other tenants are not affected.
    got = services.trajectory.read(principal(other_tenant, Role.ADMIN), other_sid,
                                   kept.record_id)
    assert got.data == b"other tenant's data"


def test_key_provider_down_fails_closed_and_loses_nothing(
    services: Services, tenant: TenantKeys, make_session: MakeSession
) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    rec = services.trajectory.write(agent, sid, "action", b"stored before the outage")
    key_file = services.settings.home / "root.key"
    moved = key_file.with_name("root.key.away")
    key_file.rename(moved)
    services.clock.advance(services.settings.key_cache_ttl_seconds + 1)  # type: ignore[attr-defined]
    with pytest.raises(KeyProviderUnavailableError) as err:
        services.trajectory.read(admin, sid, rec.record_id)
    assert (err.value.reason, err.value.status) == ("key_provider_unavailable", 503)
    with pytest.raises(KeyProviderUnavailableError):
        services.trajectory.write(agent, make_session(tenant.id), "action", b"new")
    with pytest.raises(KeyProviderUnavailableError):
        services.key_admin.rotate(tenant.id, admin)
    # A lost root key is never silently replaced by a new one.
    assert not key_file.exists()
    assert services.key_admin.status(tenant.id).current_version == 1
    moved.replace(key_file)
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(admin, sid, rec.record_id).data == b"stored before the outage"
    with services.db.session() as s:
        assert len(s.exec(select(TrajectoryRecord)).all()) == 1


def test_audit_down_means_nothing_written_or_returned(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sandboxsec.audit.errors import AuditUnavailableError

    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    rec = services.trajectory.write(agent, sid, "action", b"audited")

    def down(*_a: object, **_k: object) -> None:
        raise AuditUnavailableError("audit store down")

    monkeypatch.setattr(services.audit_writer, "append", down)
    with pytest.raises(AuditUnavailableError):
        services.trajectory.write(agent, sid, "action", b"not audited")
    with pytest.raises(AuditUnavailableError):
        services.trajectory.read(admin, sid, rec.record_id)
    with pytest.raises(AuditUnavailableError):
        services.trajectory.list(admin, sid)
    with services.db.session() as s:
        assert len(s.exec(select(TrajectoryRecord)).all()) == 1


def test_tenant_and_session_scoping(services: Services, tenant: TenantKeys,
                                    other_tenant: TenantKeys, make_session: MakeSession) -> None:
    agent = principal(tenant, Role.AGENT)
    sid, other_sid = make_session(tenant.id), make_session(other_tenant.id)
    rec = services.trajectory.write(agent, sid, "action", b"mine")
    with pytest.raises(NotFoundError):
        services.trajectory.write(agent, other_sid, "action", b"into theirs")
    with pytest.raises(NotFoundError):
        services.trajectory.write(agent, "ss_missing", "action", b"nowhere")
    other_admin = principal(other_tenant, Role.ADMIN)
    with pytest.raises(NotFoundError):
        services.trajectory.read(other_admin, sid, rec.record_id)
    with pytest.raises(NotFoundError):
        services.trajectory.read(other_admin, other_sid, rec.record_id)
    with pytest.raises(NotFoundError):
        services.trajectory.list(other_admin, sid)
    with pytest.raises(NotFoundError):
        services.trajectory.read(principal(tenant, Role.ADMIN), make_session(tenant.id),
                                 rec.record_id)


def test_refusals(services: Services, tenant: TenantKeys, make_session: MakeSession) -> None:
    agent = principal(tenant, Role.AGENT)
    sid = make_session(tenant.id)
    limit = services.settings.max_record_bytes
    with pytest.raises(TrajectoryRecordTooLargeError) as err:
        services.trajectory.write(agent, sid, "screenshot", b"\x00" * (limit + 1))
    assert err.value.status == 413
    with pytest.raises(TrajectoryKindInvalidError):
        services.trajectory.write(agent, sid, "Bad Kind", b"x")
    services.clock.advance(3601)  # type: ignore[attr-defined]
    with pytest.raises(TrajectorySessionClosedError):
        services.trajectory.write(agent, sid, "action", b"late")
    with services.db.session() as s:
        assert s.exec(select(TrajectoryRecord)).all() == []
    assert _events(services, tenant.id, "trajectory:record:refuse") == 1


def test_data_keys_are_bounded_per_key(services: Services, tenant: TenantKeys,
                                       make_session: MakeSession) -> None:
    services.key_hierarchy.max_messages = 3
    agent = principal(tenant, Role.AGENT)
    sid = make_session(tenant.id)
    for i in range(4):  # each write seals twice (metadata and data)
        services.trajectory.write(agent, sid, "action", b"r%d" % i)
        services.clock.advance(1)  # type: ignore[attr-defined]
    with services.db.session() as s:
        deks = s.exec(select(DataEncryptionKey).where(DataEncryptionKey.session_id == sid)).all()
    assert len(deks) >= 3
    admin = principal(tenant, Role.ADMIN)
    assert [v.data for v in services.trajectory.list(admin, sid)] == [b"r0", b"r1", b"r2", b"r3"]


def test_errors_are_documented() -> None:
    from pathlib import Path

    docs = (Path(__file__).parents[3] / "docs" / "encryption.md").read_text()
    import sandboxsec.crypto.errors as errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, SandboxSecError)
        assert f"`{cls.code}`" in docs, cls.code


def test_concurrent_writers_lose_nothing(services: Services, tenant: TenantKeys,
                                         make_session: MakeSession) -> None:
    from concurrent.futures import ThreadPoolExecutor

    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    services.key_hierarchy.max_messages = 7  # several data keys get used up on the way

    def write(i: int) -> str:
        return services.trajectory.write(agent, sid, "action", b"record %03d" % i).record_id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(write, range(24)))
    views = services.trajectory.list(admin, sid)
    assert sorted(v.record_id for v in views) == sorted(ids)
    assert sorted(v.data for v in views) == [b"record %03d" % i for i in range(24)]


def test_write_stream_in_chunks(services: Services, tenant: TenantKeys,
                                make_session: MakeSession) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    data = os.urandom(50_000)
    stored = services.trajectory.write_stream(
        agent, sid, "recording", (data[i : i + 7000] for i in range(0, len(data), 7000)),
        {"codec": "raw"},
    )
    assert stored.size == len(data) and stored.layout == "stream"
    got = services.trajectory.read(admin, sid, stored.record_id)
    assert (got.data, got.meta) == (data, {"codec": "raw"})
    # Passing the limit part way: refused, nothing stored, no segment left behind.
    limit = services.settings.max_record_bytes
    with pytest.raises(TrajectoryRecordTooLargeError):
        services.trajectory.write_stream(agent, sid, "recording",
                                         (b"\x00" * 10_000 for _ in range(limit // 10_000 + 2)))
    with services.db.session() as s:
        assert len(s.exec(select(TrajectoryRecord)).all()) == 1
        assert len(s.exec(select(TrajectorySegment)).all()) == len(data) // 1024 + 1
