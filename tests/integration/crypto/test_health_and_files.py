"""Health tells the truth about the key provider; state files are the owner's alone."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fastapi.testclient import TestClient

from sandboxsec.principal import Role
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import principal
from tests.integration.crypto.test_trajectory import MakeSession


def test_healthz_is_not_ok_once_the_root_key_file_is_gone(
    client: TestClient, services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    # Before any tenant key exists, a missing root key is a fresh install: ready.
    assert client.get("/healthz").json()["key_provider"] == "ok"
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "a", b"x")
    assert client.get("/healthz").status_code == 200
    root = services.settings.home / "root.key"
    moved = root.with_name("root.key.away")
    root.rename(moved)
    try:
        r = client.get("/healthz")
        assert (r.status_code, r.json()["key_provider"], r.json()["status"]) == (
            503, "unavailable", "degraded")
        # Also when the tenant key files are gone too (only the database remembers keys).
        store_dir = services.settings.home / "tenant-keys"
        hidden = store_dir.with_name("tenant-keys.away")
        store_dir.rename(hidden)
        try:
            assert client.get("/healthz").status_code == 503
        finally:
            hidden.rename(store_dir)
    finally:
        moved.rename(root)
    assert client.get("/healthz").status_code == 200


def test_healthz_is_not_ok_when_the_root_key_is_readable_by_others(
    client: TestClient, services: Services, tenant: TenantKeys, make_session: MakeSession,
) -> None:
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "a", b"x")
    root = services.settings.home / "root.key"
    root.chmod(0o644)
    try:
        assert client.get("/healthz").status_code == 503
    finally:
        root.chmod(0o600)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_every_state_file_is_private(tmp_path: Path, services: Services, tenant: TenantKeys,
                                     make_session: MakeSession, client: TestClient) -> None:
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id), "a", b"x")
    services.audit.checkpoint_now(tenant.id)
    client.post("/v1/actions", headers=tenant.headers("agent"), json={})  # policy keys
    home = services.settings.home
    files = [p for p in home.rglob("*") if p.is_file()]
    assert files
    assert "root.key" in {p.name for p in files}
    # The service's signing and MAC keys are the cluster's, in the database: no key files.
    assert not {p.name for p in files} & {"signing_key.pem", "hmac_secret",
                                          "attestation-token-key.pem", "attestation-nonce-key"}
    for p in files:
        assert _mode(p) == 0o600, p
    for d in [home, *(p for p in home.rglob("*") if p.is_dir())]:
        assert _mode(d) & 0o077 == 0, d


def test_sqlite_files_are_0600_even_when_left_open_by_an_older_version(
    tmp_path: Path, settings: Settings,
) -> None:
    path = tmp_path / "state" / "sandboxsec.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    assert db.ping()
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        if f.exists():
            assert _mode(f) == 0o600, f
    assert _mode(path.parent) == 0o700
    db.dispose()
    os.chmod(path, 0o644)
    db = Database(f"sqlite:///{path}")
    try:
        assert _mode(path) == 0o600
    finally:
        db.dispose()

