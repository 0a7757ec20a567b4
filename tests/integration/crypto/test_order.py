"""Authenticated trajectory order and keyed digests, attacked by editing database rows.

An insider with write access to the database reorders, re-attributes, removes and downgrades
records; every edit is refused on read with its own reason code, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, update
from sqlmodel import col, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.models import AuditEntryRow
from sandboxsec.crypto.envelope import open_sealed, seal
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
)
from sandboxsec.errors import SandboxSecError
from sandboxsec.principal import Role
from sandboxsec.services import Services
from sandboxsec.trajectory.format import record_context
from sandboxsec.trajectory.models import TrajectoryHead, TrajectoryRecord
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import principal

MakeSession = Callable[[str], str]


def _edit(services: Services, record_id: str, **values: object) -> None:
    with services.db.session() as s:
        s.exec(update(TrajectoryRecord).where(col(TrajectoryRecord.id) == record_id)
               .values(**values))


def _write(services: Services, tenant: TenantKeys, sid: str, n: int) -> list[str]:
    agent = principal(tenant, Role.AGENT)
    return [services.trajectory.write(agent, sid, "action", f"step {i}".encode(),
                                      {"i": i}).record_id for i in range(n)]


def _failed_reads(services: Services, tenant_id: str) -> list[str | None]:
    with services.db.session() as s:
        rows = s.exec(select(AuditEntryRow).where(
            AuditEntryRow.tenant_id == tenant_id,
            AuditEntryRow.event == str(AuditEvent.TRAJECTORY_READ))).all()
    return [json.loads(r.entry)["reason"] for r in rows
            if json.loads(r.entry)["outcome"] == "failure"]


def test_records_are_numbered_gap_free_and_read_in_order(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 5)
    admin = principal(tenant, Role.ADMIN)
    views = services.trajectory.list(admin, sid)
    assert [v.record_id for v in views] == ids
    assert [v.seq for v in views] == [0, 1, 2, 3, 4]
    assert [v.meta for v in views] == [{"i": i} for i in range(5)]
    # Paging continues from the anchor's position.
    page = services.trajectory.list(admin, sid, limit=2, after=ids[1])
    assert [v.seq for v in page] == [2, 3]


def test_swapped_positions_are_reordered(services: Services, tenant: TenantKeys,
                                         make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 3)
    admin = principal(tenant, Role.ADMIN)
    # Swap through a free value (the unique constraint holds at every step).
    _edit(services, ids[0], seq=99)
    _edit(services, ids[2], seq=0)
    _edit(services, ids[0], seq=2)
    with pytest.raises(TrajectoryRecordReorderedError):
        services.trajectory.list(admin, sid)
    with pytest.raises(TrajectoryRecordReorderedError):
        services.trajectory.read(admin, sid, ids[2])
    with pytest.raises(TrajectoryRecordReorderedError):
        b"".join(services.trajectory.iter_data(admin, sid, ids[0]))
    # Moving the timestamps instead changes nothing: order is by the sealed position.
    assert "trajectory_record_reordered" in _failed_reads(services, tenant.id)


def test_changed_author_is_reattributed(services: Services, tenant: TenantKeys,
                                        make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 2)
    admin = principal(tenant, Role.ADMIN)
    _edit(services, ids[1], created_by=tenant.key_ids["approver"])
    with pytest.raises(TrajectoryRecordReattributedError):
        services.trajectory.read(admin, sid, ids[1])
    with pytest.raises(TrajectoryRecordReattributedError):
        services.trajectory.list(admin, sid)
    assert services.trajectory.read(admin, sid, ids[0]).created_by == tenant.key_ids["agent"]
    assert "trajectory_record_reattributed" in _failed_reads(services, tenant.id)


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_a_removed_record_is_missing(services: Services, tenant: TenantKeys,
                                     make_session: MakeSession, victim: int) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 5)
    admin = principal(tenant, Role.ADMIN)
    with services.db.session() as s:
        s.exec(delete(TrajectoryRecord).where(col(TrajectoryRecord.id) == ids[victim]))
    with pytest.raises(TrajectoryRecordMissingError):
        services.trajectory.list(admin, sid)
    assert "trajectory_record_missing" in _failed_reads(services, tenant.id)


def test_every_record_removed_is_missing(services: Services, tenant: TenantKeys,
                                         make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    _write(services, tenant, sid, 2)
    with services.db.session() as s:
        s.exec(delete(TrajectoryRecord).where(col(TrajectoryRecord.session_id) == sid))
    with pytest.raises(TrajectoryRecordMissingError):
        services.trajectory.list(principal(tenant, Role.ADMIN), sid)


def test_a_gap_filled_by_renumbering_is_reordered(services: Services, tenant: TenantKeys,
                                                  make_session: MakeSession) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 4)
    with services.db.session() as s:
        s.exec(delete(TrajectoryRecord).where(col(TrajectoryRecord.id) == ids[1]))
    _edit(services, ids[3], seq=1)
    with services.db.session() as s:
        s.exec(update(TrajectoryHead).where(col(TrajectoryHead.session_id) == sid)
               .values(next_seq=3))
    with pytest.raises(TrajectoryRecordReorderedError):
        services.trajectory.list(principal(tenant, Role.ADMIN), sid)


def test_position_dropped_to_the_old_format_does_not_open(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    sid = make_session(tenant.id)
    ids = _write(services, tenant, sid, 1)
    _edit(services, ids[0], seq=None)
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(principal(tenant, Role.ADMIN), sid, ids[0])


def test_a_record_moved_to_another_session_does_not_open(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    s1, s2 = make_session(tenant.id), make_session(tenant.id)
    ids = _write(services, tenant, s1, 1)
    _write(services, tenant, s2, 1)
    _edit(services, ids[0], session_id=s2, seq=1)
    with pytest.raises(SandboxSecError):
        services.trajectory.list(principal(tenant, Role.ADMIN), s2)


def test_records_from_before_order_keep_working_and_come_first(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    """A record in the old format (seq NULL, plain content_sha256, meta without position)
    stays readable; ordered records follow it."""
    sid = make_session(tenant.id)
    first = _write(services, tenant, sid, 1)[0]
    with services.db.session() as s:
        row = s.get(TrajectoryRecord, first)
        assert row is not None
        ring = services.key_hierarchy.keyring_for_read(s, tenant.id)
        key = services.key_hierarchy.data_key(s, tenant.id, row.dek_id, ring)
        data = open_sealed(key, row.data, record_context(tenant.id, sid, first, "data",
                                                         "action"))
        row.meta_sealed = bytes(seal(key, b'{"old":true}',
                                     record_context(tenant.id, sid, first, "meta", "action")))
        row.seq = None
        row.content_hmac = ""
        row.content_sha256 = hashlib.sha256(data).hexdigest()
        s.add(row)
        s.exec(update(TrajectoryHead).where(col(TrajectoryHead.session_id) == sid)
               .values(next_seq=0))
    later = _write(services, tenant, sid, 2)
    views = services.trajectory.list(principal(tenant, Role.ADMIN), sid)
    assert [v.record_id for v in views] == [first, *later]
    assert views[0].meta == {"old": True} and views[0].seq is None
    assert [v.seq for v in views[1:]] == [0, 1]
    page = services.trajectory.list(principal(tenant, Role.ADMIN), sid, after=first)
    assert [v.record_id for v in page] == later


def test_concurrent_writers_get_distinct_gap_free_positions(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    sid = make_session(tenant.id)
    agent = principal(tenant, Role.AGENT)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for i in range(10):
                services.trajectory.write(agent, sid, "action", f"{w}/{i}".encode())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    views = services.trajectory.list(principal(tenant, Role.ADMIN), sid)
    assert [v.seq for v in views] == list(range(40))


def test_stored_and_audited_digests_are_keyed(services: Services, tenant: TenantKeys,
                                              other_tenant: TenantKeys,
                                              make_session: MakeSession) -> None:
    pin = b"481516"
    sa, sb = make_session(tenant.id), make_session(other_tenant.id)
    a = services.trajectory.write(principal(tenant, Role.AGENT), sa, "action", pin)
    b = services.trajectory.write(principal(other_tenant, Role.AGENT), sb, "action", pin)
    plain = hashlib.sha256(pin).hexdigest()
    # The writer gets the plain digest of what it sent; storage and audit never see it.
    assert a.content_sha256 == plain
    assert a.content_hmac and a.content_hmac != plain
    # Per tenant: the same content has unrelated digests in two tenants.
    assert a.content_hmac != b.content_hmac
    with services.db.session() as s:
        row = s.get(TrajectoryRecord, a.record_id)
        entries = s.exec(select(AuditEntryRow).where(
            AuditEntryRow.tenant_id == tenant.id)).all()
    assert row is not None and row.content_sha256 == "" and row.content_hmac == a.content_hmac
    text = "\n".join(e.entry for e in entries)
    assert plain not in text
    write = next(json.loads(e.entry) for e in entries
                 if e.event == str(AuditEvent.TRAJECTORY_WRITE))
    assert write["body"]["content_hmac"] == a.content_hmac
    assert write["body"]["seq"] == 0 and "content_sha256" not in write["body"]
    # A brute force over every 6-digit PIN with the plain digest finds nothing stored.
    assert services.trajectory.read(principal(tenant, Role.ADMIN), sa,
                                    a.record_id).content_sha256 == plain


def test_shredding_kills_the_digest_key(services: Services, tenant: TenantKeys,
                                        make_session: MakeSession) -> None:
    from sandboxsec.crypto.errors import TenantKeysShreddedError

    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "a", b"x")
    key = services.key_hierarchy.digest_key(tenant.id)
    assert len(key) == 32
    services.key_admin.shred_tenant(tenant.id, None)
    with pytest.raises(TenantKeysShreddedError):
        services.key_hierarchy.digest_key(tenant.id)


def test_api_answers_the_reason_code(client: TestClient, services: Services,
                                     tenant: TenantKeys) -> None:
    from tests.conftest import make_session as insert_session

    sid = insert_session(services, tenant)
    r = client.post(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("agent"),
                    json={"kind": "action", "data": "aGVsbG8=", "meta": {}})
    assert r.status_code == 201, r.text
    assert r.json()["seq"] == 0 and r.json()["content_hmac"]
    _edit(services, r.json()["record_id"], created_by=tenant.key_ids["admin"])
    r = client.get(f"/v1/sessions/{sid}/trajectory", headers=tenant.headers("admin"))
    assert (r.status_code, r.json()["error"]["code"]) == (422, "trajectory_record_reattributed")
