"""The user's first five minutes: create a tenant with the CLI, start the server, call it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TenantKeys  # noqa: F401 - fixture types
from tests.support.serve import CLI as SANDBOXSEC
from tests.support.serve import Server, clean_env


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    env = clean_env(tmp_path / "svc", db_url)
    server = Server(env, tmp_path / "server.log", workers=1, migrate=False)
    server.start()
    try:
        yield server.base, env
    finally:
        server.stop()
    # What the server printed tells the user where it listens and how to get a key.
    out = server.output()
    assert f"listening on {server.base}" in out
    assert "tenant create" in out


def test_new_user_creates_tenant_and_calls_api(server: tuple[str, dict[str, str]]) -> None:
    base, env = server
    out = subprocess.run(
        [*SANDBOXSEC, "tenant", "create", "acme-bank"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(out.stdout)
    assert set(created["keys"]) == {"admin", "agent", "approver", "auditor"}
    r = httpx.get(
        f"{base}/v1/tenant", headers={"Authorization": f"Bearer {created['keys']['admin']}"}
    )
    assert r.status_code == 200
    assert r.json()["tenant_name"] == "acme-bank" and r.json()["role"] == "admin"
    # the same name again is refused with a reason code and exit 2
    again = subprocess.run(
        [*SANDBOXSEC, "tenant", "create", "acme-bank"], env=env, capture_output=True, text=True
    )
    assert again.returncode == 2
    assert "tenant_name_taken" in again.stderr
    # the keys are stored hashed: the database file never contains them
    home = Path(env["SANDBOXSEC_HOME"])
    if "SANDBOXSEC_DATABASE_URL" not in env:
        raw = b"".join(p.read_bytes() for p in home.glob("sandboxsec.db*"))
        for key in created["keys"].values():
            assert key.encode() not in raw
            assert key[21:].encode() not in raw  # the secret part alone


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    env = clean_env(tmp_path, None)
    r = subprocess.run([*SANDBOXSEC, "tenant"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([*SANDBOXSEC, "no-such-command"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
