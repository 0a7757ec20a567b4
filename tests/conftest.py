"""Shared fixtures: databases (SQLite and a throwaway PostgreSQL 15), services, app, tenants."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings as hypothesis_settings

from sandboxsec.clock import FixedClock
from sandboxsec.principal import Role
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.support.pgcluster import PgCluster

#: Shared fixtures that live with their helpers: ``database_url`` (a server migrates it
#: itself), ``tpm`` and ``other_tpm`` (booted swtpm devices, one per module).
pytest_plugins = ["tests.support.serve", "tests.support.swtpm"]

_counter = itertools.count()

# CI runs the property tests with a fixed seed sequence, so a red build is reproducible and a
# green one does not depend on luck; developers' runs stay random and keep finding new cases.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster | None]:
    """The suite's PostgreSQL cluster (``SANDBOXSEC_TEST_NO_PG=1`` skips PostgreSQL tests)."""
    if os.environ.get("SANDBOXSEC_TEST_NO_PG") == "1":
        yield None
        return
    cluster = PgCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PgCluster | None) -> str | None:
    """Name of a migrated template database that per-test databases are copied from."""
    if pg_cluster is None:
        return None
    db = Database(pg_cluster.create_database("sandboxsec_template"))
    db.migrate()
    db.dispose()
    return "sandboxsec_template"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that per-test databases are copied from (as PostgreSQL's are
    from ``pg_template``): migrating every test's file cost more than many of the tests."""
    path = tmp_path_factory.mktemp("sqlite-template") / "sandboxsec.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    db.dispose()  # the last connection checkpoints the WAL into the file and removes it
    assert not Path(f"{path}-wal").exists(), "the template's WAL was not checkpointed"
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, migrated database URL: each test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "state" / "sandboxsec.db"
        path.parent.mkdir(mode=0o700)
        # Created 0600 before the bytes go in, as the service creates its own file.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(template.read_bytes())
        yield f"sqlite:///{path}"
        return
    cluster: PgCluster | None = request.getfixturevalue("pg_cluster")
    if cluster is None:
        pytest.skip("PostgreSQL disabled (SANDBOXSEC_TEST_NO_PG=1)")
    pg_template: str = request.getfixturevalue("pg_template")
    url = cluster.create_database(f"t_{os.getpid()}_{next(_counter)}", template=pg_template)
    yield url
    cluster.drop_database(url)


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    """A fresh migrated :class:`Database` (SQLite and PostgreSQL)."""
    db = Database(db_url)
    yield db
    db.dispose()


@pytest.fixture
def sqlite_database(tmp_path: Path) -> Iterator[Database]:
    """A fresh migrated SQLite :class:`Database`, for tests that need only one backend."""
    db = Database(f"sqlite:///{tmp_path / 'state' / 'sandboxsec.db'}")
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with ``home`` in a tmp dir (set in the environment for code that reads it)."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("SANDBOXSEC_HOME", str(home))
    return Settings(home=home, public_url="http://testserver")


@pytest.fixture
def clock() -> FixedClock:
    """A clock that moves only when a test says so."""
    from datetime import UTC, datetime

    return FixedClock(datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC))


@pytest.fixture
def services(settings: Settings, database: Database, clock: FixedClock) -> Iterator[Services]:
    """A :class:`Services` on a fresh database (both backends) with a fixed clock."""
    svc = Services(settings, clock=clock, db=database)
    yield svc
    svc.close()


@pytest.fixture
def client(services: Services) -> Iterator[TestClient]:
    """An HTTP client for the app on ``services`` (no network: ASGI in process)."""
    from sandboxsec.api.app import create_app
    from tests.support.sessionkeys import proof_auth_for

    with TestClient(create_app(services), raise_server_exceptions=False) as c:
        # Requests acting in a test session carry its proof, as the agent client sends them.
        c.auth = proof_auth_for(c, services.clock.now)
        yield c


@dataclass
class TenantKeys:
    """A tenant created for a test, with one API key per role."""

    id: str
    name: str
    keys: dict[str, str] = field(default_factory=dict)
    key_ids: dict[str, str] = field(default_factory=dict)

    def headers(self, role: str | Role) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[str(role)]}"}


def make_tenant(services: Services, name: str) -> TenantKeys:
    created = services.tenants.create(name)
    return TenantKeys(
        id=created.tenant_id,
        name=created.name,
        keys={str(r): k.key for r, k in created.keys.items()},
        key_ids={str(r): k.key_id for r, k in created.keys.items()},
    )


@pytest.fixture
def tenant(services: Services) -> TenantKeys:
    """Tenant A."""
    return make_tenant(services, "tenant-a")


@pytest.fixture
def other_tenant(services: Services) -> TenantKeys:
    """Tenant B, for cross-tenant tests."""
    return make_tenant(services, "tenant-b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long soak/load runs are marked ``slow``: only ``make soak`` (SANDBOXSEC_SOAK=1) runs them."""
    if os.environ.get("SANDBOXSEC_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `make soak`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def make_session(services: Services, tenant: TenantKeys, *, attested: bool = True,
                 image_name: str = "bank-desktop", ttl_seconds: int = 3600) -> str:
    """Insert an agent session row directly (test set-up only; the product starts sessions
    solely from an affirming attestation, tested in tests/integration/attestation)."""
    from datetime import timedelta

    from sandboxsec.ids import new_id
    from sandboxsec.sessions.models import AgentSession
    from tests.support.sessionkeys import new_key

    now = services.clock.now()
    sid = new_id("ses")
    with services.db.session() as s:
        s.add(AgentSession(id=sid, tenant_id=tenant.id, image_name=image_name,
                           image_digest="sha256:" + "ab" * 32, ak_name="000b" + "cd" * 32,
                           attested=attested, created_by=tenant.key_ids["agent"],
                           created_at=now, expires_at=now + timedelta(seconds=ttl_seconds),
                           key_thumbprint=new_key(sid).jkt))
    return sid
