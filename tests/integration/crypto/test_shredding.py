"""Crypto-shredding destroys key material outside the database: an attacker who copies the
database files after ``tenant delete`` and holds the root key recovers nothing.

The attack is carried out for real: the SQLite file and its WAL, or the PostgreSQL heap and
WAL files under the test cluster's data directory, are read as raw bytes; every position near
the tenant's id is tried as a wrapped KEK under the root key.  A control run with the tenant
key (copied before the deletion) finds the same KEKs in the same bytes, so the carver works and
the only thing standing between the attacker and the data is the destroyed tenant key.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import select

from sandboxsec.crypto.envelope import encode_context, unwrap_secret
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    TenantKeyMissingError,
    TenantKeysShreddedError,
)
from sandboxsec.crypto.keys import LocalKeyProvider
from sandboxsec.crypto.models import KeyEncryptionKey
from sandboxsec.crypto.tenant_keys import LocalTenantKeyStore, is_tenant_wrapped
from sandboxsec.principal import Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import principal

MakeSession = Callable[[str], str]
SECRET = b"IBAN DE89 3704 0044 0532 0130 00, PIN 481516"
_WRAPPED_LEN = 1 + 12 + 32 + 16


def _kek_aad(tenant_id: str, version: int) -> bytes:
    # What docs/encryption.md tells anyone: ("sandboxsec/kek/v1", tenant, version).
    return encode_context("sandboxsec/kek/v1", tenant_id, str(version))


def _database_files(services: Services, request: pytest.FixtureRequest) -> Iterator[bytes]:
    """The raw bytes an attacker copies: the SQLite file and WAL, or PostgreSQL's heap and
    WAL files of this database (after a checkpoint, as a backup or a disk image would be)."""
    url = services.db.url
    if services.db.is_sqlite:
        path = Path(url.split("sqlite:///", 1)[1])
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-journal")):
            if candidate.exists():
                yield candidate.read_bytes()
        return
    cluster = request.getfixturevalue("pg_cluster")
    with services.db.engine.connect() as conn:
        oid = conn.execute(text("SELECT oid FROM pg_database WHERE datname = current_database()"))
        db_oid = oid.scalar_one()
        conn.execute(text("CHECKPOINT"))
    roots = [cluster.data / "base" / str(db_oid), cluster.data / "pg_wal"]
    for root in roots:
        for f in sorted(root.iterdir()):
            if f.is_file():
                yield f.read_bytes()


def _carve(blobs: list[bytes], tenant_id: str, unwrap: Callable[[bytes, bytes], bytes]
           ) -> set[bytes]:
    """Every KEK that ``unwrap`` opens from bytes near an occurrence of the tenant id."""
    marker = tenant_id.encode()
    # The same bytes recur (WAL frames, page copies): try each distinct candidate once.
    candidates: set[bytes] = set()
    for blob in blobs:
        pos = blob.find(marker)
        while pos != -1:
            lo, hi = max(0, pos - 600), min(len(blob), pos + 600)
            for off in range(lo, hi):
                if blob[off] not in (1, 2, 3, 4):
                    continue
                cand = blob[off : off + _WRAPPED_LEN]
                if len(cand) < _WRAPPED_LEN:
                    break
                candidates.add(cand)
            pos = blob.find(marker, pos + 1)
    found: set[bytes] = set()
    for cand in candidates:
        for version in (1, 2, 3):
            try:
                found.add(unwrap(cand, _kek_aad(tenant_id, version)))
            except DecryptionFailedError:
                continue
    return found


def _with_key(key: bytes) -> Callable[[bytes, bytes], bytes]:
    # Whatever format byte the carved bytes start with, try them as an AES-GCM wrap under key.
    return lambda cand, aad: unwrap_secret(key, b"\x01" + cand[1:], aad)


def test_copy_of_the_database_after_delete_with_the_root_key_recovers_nothing(
    services: Services, tenant: TenantKeys, make_session: MakeSession,
    request: pytest.FixtureRequest,
) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    first = services.trajectory.write(agent, sid, "action", SECRET)
    services.key_admin.rotate(tenant.id, admin)
    services.trajectory.write(agent, sid, "action", SECRET + b" again")
    provider = services.keys
    assert isinstance(provider, LocalKeyProvider)
    store = services.key_hierarchy.tenant_keys
    assert isinstance(store, LocalTenantKeyStore)
    key_file = store.path(tenant.id)
    # What the insider could have copied before: only used for the control below.
    key_file_before = key_file.read_bytes()
    with services.db.session() as s:
        stored = s.exec(select(KeyEncryptionKey).where(KeyEncryptionKey.tenant_id == tenant.id))
        wrapped_before = {r.version: r.wrapped_key for r in stored.all()}
    assert set(wrapped_before) == {1, 2}
    assert all(is_tenant_wrapped(w) for w in wrapped_before.values())

    deleted = services.tenants.delete(tenant.id, actor=None)
    assert deleted.keks_destroyed == 2
    assert not key_file.exists()

    blobs = list(_database_files(services, request))
    root_key = provider.path.read_bytes()
    # The attack: root key plus every candidate position in the copied files.
    assert _carve(blobs, tenant.id, _with_key(root_key)) == set()
    # Control: the wrapped KEKs are still in those bytes, and the tenant key (had it not been
    # destroyed) would open them; the carver is not simply missing them.
    tenant_key = provider.unwrap(key_file_before, encode_context("sandboxsec/tenant-key/v1",
                                                                 tenant.id))
    recovered = _carve(blobs, tenant.id, _with_key(tenant_key))
    assert len(recovered) == 2
    # And the service itself cannot read or write the tenant any more.
    with pytest.raises(TenantKeysShreddedError):
        services.trajectory.read(admin, sid, first.record_id)
    # The copy of the key file taken before was overwritten on disk, not only unlinked: a
    # new file of the same name would not bring it back (the service never re-creates it).
    assert not store.exists(tenant.id)


def test_key_store_files_are_private(services: Services, tenant: TenantKeys,
                                     make_session: MakeSession) -> None:
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "action",
                              b"x")
    store = services.key_hierarchy.tenant_keys
    assert isinstance(store, LocalTenantKeyStore)
    assert store.directory != services.settings.home
    assert os.stat(store.directory).st_mode & 0o777 == 0o700
    assert os.stat(store.path(tenant.id)).st_mode & 0o777 == 0o600


def test_lost_tenant_key_fails_closed_and_other_tenants_keep_working(
    services: Services, tenant: TenantKeys, other_tenant: TenantKeys, make_session: MakeSession,
) -> None:
    sa, sb = make_session(tenant.id), make_session(other_tenant.id)
    a = services.trajectory.write(principal(tenant, Role.AGENT), sa, "action", b"a")
    b = services.trajectory.write(principal(other_tenant, Role.AGENT), sb, "action", b"b")
    store = services.key_hierarchy.tenant_keys
    assert isinstance(store, LocalTenantKeyStore)
    shutil.move(store.path(tenant.id), store.directory / "moved-away")
    services.key_hierarchy.forget_keys()
    with pytest.raises(TenantKeyMissingError) as err:
        services.trajectory.read(principal(tenant, Role.ADMIN), sa, a.record_id)
    assert err.value.status == 503
    # No new key is made over a lost one: a write fails closed too.
    with pytest.raises(TenantKeyMissingError):
        services.key_admin.rotate(tenant.id, None)
    assert services.trajectory.read(principal(other_tenant, Role.ADMIN), sb,
                                    b.record_id).data == b"b"
    shutil.move(store.directory / "moved-away", store.path(tenant.id))
    assert services.trajectory.read(principal(tenant, Role.ADMIN), sa, a.record_id).data == b"a"


def test_keks_from_before_tenant_keys_move_under_the_tenant_key(
    services: Services, tenant: TenantKeys, other_tenant: TenantKeys, make_session: MakeSession,
) -> None:
    """Migration path: KEKs wrapped by the root key alone (the old format) keep working and
    are re-wrapped under the tenant key on first use, or by ``migrate_tenant_keys``."""
    sa, sb = make_session(tenant.id), make_session(other_tenant.id)
    a = services.trajectory.write(principal(tenant, Role.AGENT), sa, "action", b"old a")
    b = services.trajectory.write(principal(other_tenant, Role.AGENT), sb, "action", b"old b")
    store = services.key_hierarchy.tenant_keys
    provider = services.keys
    # Turn both tenants' KEKs back into the old format, as an older version stored them.
    with services.db.session() as s:
        for row in s.exec(select(KeyEncryptionKey)).all():
            aad = _kek_aad(row.tenant_id, row.version)
            material = store.unwrap(row.tenant_id, row.wrapped_key, aad)
            row.wrapped_key = provider.wrap(material, aad)
            assert not is_tenant_wrapped(row.wrapped_key)
            s.add(row)
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(principal(tenant, Role.ADMIN), sa, a.record_id).data == b"old a"
    assert services.key_hierarchy.migrate_tenant_keys() == 1  # only b's is left to move
    with services.db.session() as s:
        assert all(is_tenant_wrapped(r.wrapped_key) for r in s.exec(select(KeyEncryptionKey)))
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(principal(other_tenant, Role.ADMIN), sb,
                                    b.record_id).data == b"old b"
    assert services.key_hierarchy.migrate_tenant_keys() == 0


def test_a_kek_moved_to_another_tenant_does_not_open(
    services: Services, tenant: TenantKeys, other_tenant: TenantKeys, make_session: MakeSession,
) -> None:
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "a", b"x")
    sb = make_session(other_tenant.id)
    rec = services.trajectory.write(principal(other_tenant, Role.AGENT), sb, "a", b"y")
    with services.db.session() as s:
        mine = s.exec(select(KeyEncryptionKey).where(
            KeyEncryptionKey.tenant_id == tenant.id)).one()
        theirs = s.exec(select(KeyEncryptionKey).where(
            KeyEncryptionKey.tenant_id == other_tenant.id)).one()
        theirs.wrapped_key = mine.wrapped_key
        s.add(theirs)
    services.key_hierarchy.forget_keys()
    with pytest.raises(DecryptionFailedError):
        services.trajectory.read(principal(other_tenant, Role.ADMIN), sb, rec.record_id)


def test_a_root_wrap_of_the_wrong_tenant_key_file_is_refused(tmp_path: Path) -> None:
    provider = LocalKeyProvider(tmp_path / "home")
    store = LocalTenantKeyStore(tmp_path / "tenant-keys", provider)
    wrapped = store.wrap("tn_a", b"k" * 32, b"aad", create=True)
    # A key file copied over another tenant's is bound to its own tenant id.
    shutil.copy(store.path("tn_a"), tmp_path / "tenant-keys" / "tn_b.key")
    from sandboxsec.crypto.errors import KeyProviderUnavailableError

    with pytest.raises(KeyProviderUnavailableError):
        store.unwrap("tn_b", wrapped, b"aad")
    assert store.unwrap("tn_a", wrapped, b"aad") == b"k" * 32
    assert store.destroy("tn_a") and not store.destroy("tn_a")
    with pytest.raises(TenantKeyMissingError):
        store.unwrap("tn_a", wrapped, b"aad")
    with pytest.raises(ValueError):
        store.path("../escape")
