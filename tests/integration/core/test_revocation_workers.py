"""A revoked API key stops working at once on every worker process of the server."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.serve import CLI as SANDBOXSEC
from tests.support.serve import clean_env, serving


@pytest.fixture
def two_workers(tmp_path: Path, db_url: str) -> Iterator[tuple[str, dict[str, str]]]:
    env = clean_env(tmp_path / "svc", db_url)
    with serving(env, tmp_path / "server.log", workers=2, migrate=False) as server:
        yield server.base, env


def _fresh_get(base: str, path: str, key: str) -> int:
    # A new connection per request, so the kernel spreads them over both workers.
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}",
                                           "Connection": "close"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_revocation_reaches_every_worker_at_once(
        two_workers: tuple[str, dict[str, str]]) -> None:
    base, env = two_workers
    created = json.loads(subprocess.run([*SANDBOXSEC, "tenant", "create", "bank"], env=env,
                                        check=True, capture_output=True, text=True).stdout)
    admin = {"Authorization": f"Bearer {created['keys']['admin']}"}
    issued = httpx.post(f"{base}/v1/api-keys", json={"role": "agent", "label": "victim"},
                        headers=admin).json()
    # Both workers have seen (and, before the fix, cached) the key.
    assert {_fresh_get(base, "/v1/tenant", issued["key"]) for _ in range(40)} == {200}
    r = httpx.delete(f"{base}/v1/api-keys/{issued['key_id']}", headers=admin)
    assert r.status_code == 204
    # Not one request after the revocation returned is let through, on either worker.
    statuses = [_fresh_get(base, "/v1/tenant", issued["key"]) for _ in range(40)]
    assert set(statuses) == {401}, statuses
    # The admin's own key, on the same workers, still works.
    assert httpx.get(f"{base}/v1/tenant", headers=admin).status_code == 200
