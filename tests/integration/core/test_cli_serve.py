"""The user's first five minutes: create a tenant with the CLI, start the server, call it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TenantKeys  # noqa: F401 - fixture types

SANDBOXSEC = [sys.executable, "-m", "sandboxsec.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(home: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env["SANDBOXSEC_HOME"] = str(home)
    if db_url and db_url.startswith("postgresql"):
        env["SANDBOXSEC_DATABASE_URL"] = db_url
    return env


@pytest.fixture
def server(tmp_path: Path, db_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path / "svc"
    env = _env(home, db_url)
    port = _free_port()
    proc = subprocess.Popen(
        [*SANDBOXSEC, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # a loaded machine starts a Python process slowly
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")
        yield base, env
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        # What the server printed tells the user where it listens and how to get a key.
        assert f"listening on {base}" in out
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
    env = _env(tmp_path, None)
    r = subprocess.run([*SANDBOXSEC, "tenant"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    r = subprocess.run([*SANDBOXSEC, "no-such-command"], env=env, capture_output=True, text=True)
    assert r.returncode == 2
