"""Fixtures of the encryption tests: small stream segments, sessions, a SoftHSM2 token."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from sandboxsec.clock import FixedClock
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from sandboxsec.sessions.models import AgentSession
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys
from tests.support.sessionkeys import new_key

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
#: Small sizes so the streaming format (several segments) is exercised by small records.
SMALL = {"stream_threshold_bytes": 4096, "stream_segment_bytes": 1024,
         "max_record_bytes": 256 * 1024}


@pytest.fixture
def services(settings: Settings, database: Database, clock: FixedClock) -> Iterator[Services]:
    """Services with small stream segments (both database backends)."""
    svc = Services(settings.model_copy(update=SMALL), clock=clock, db=database)
    yield svc
    svc.close()


@pytest.fixture
def make_session(services: Services) -> Callable[[str], str]:
    """Insert an open agent session for a tenant; returns its id."""

    def make(tenant_id: str) -> str:
        from sandboxsec.ids import new_id

        now = services.clock.now()
        sid = new_id("ss")
        with services.db.session() as s:
            s.add(AgentSession(id=sid, tenant_id=tenant_id, attested=True, created_at=now,
                               expires_at=now + timedelta(hours=1),
                               key_thumbprint=new_key(sid).jkt))
        return sid

    return make


def principal(t: TenantKeys, role: Role) -> Principal:
    return Principal(tenant_id=t.id, key_id=t.key_ids[str(role)], role=role)


class SoftHsm:
    """A SoftHSM2 token in a temp dir (one per test process: the module reads its config once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
        self.label = "sandboxsec-test"
        self.pin = "24681357"
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", self.label,
             "--pin", self.pin, "--so-pin", "13572468"],
            check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
        )

    def remove_token(self) -> None:
        shutil.move(self.tokens, self.root / "removed")

    def restore_token(self) -> None:
        shutil.move(self.root / "removed", self.tokens)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    return SoftHsm(tmp_path_factory.mktemp("softhsm"))
