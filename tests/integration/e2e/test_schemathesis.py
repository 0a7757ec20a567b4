"""Property-based API testing of the running service against its own OpenAPI description.

Every operation, called with the key of a role allowed to use it and with generated
(valid and invalid) input: never a 5xx, and every answer matches the documented schema.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.e2e.test_access_matrix import ALL, EXPECTED
from tests.support.serve import free_port


@pytest.fixture(scope="module")
def running_service(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, str]]]:
    home = tmp_path_factory.mktemp("schemathesis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env["SANDBOXSEC_HOME"] = str(home)
    cli = [sys.executable, "-m", "sandboxsec.cli"]
    subprocess.run([*cli, "migrate"], env=env, capture_output=True, check=True)
    created = json.loads(subprocess.run([*cli, "tenant", "create", "schemathesis-tenant-7f3a"],
                                        env=env, capture_output=True, text=True,
                                        check=True).stdout)
    port = free_port()
    proc = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base, created["keys"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def api_schema(running_service: tuple[str, dict[str, str]]) -> schemathesis.BaseSchema:
    base, _ = running_service
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


def _role_for(method: str, path: str) -> str | None:
    allowed = EXPECTED.get((method.upper(), path))
    if not allowed:
        return None
    for role in ("agent", "approver", "admin", "auditor"):
        if role in allowed:
            return role
    return None


CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance]


def _fuzz(operation: Any, base: str, headers: dict[str, str], calls: list[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def run(case: Case) -> None:
        if case.path.endswith("/wait") and isinstance(case.query, dict):
            case.query["timeout"] = 0
        resp = case.call_and_validate(base_url=base, headers=headers, timeout=30, checks=CHECKS)
        calls.append(resp.status_code)

    run()


def test_api_matches_its_schema_and_never_fails(
    api_schema: schemathesis.BaseSchema, running_service: tuple[str, dict[str, str]]
) -> None:
    base, keys = running_service
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 30
    calls: list[int] = []

    for operation in operations:
        role = _role_for(operation.method, operation.path)
        assert role is None or role in ALL
        headers = {"Authorization": f"Bearer {keys[role]}"} if role else {}
        _fuzz(operation, base, headers, calls)
    # Generated input reached the handlers: both accepted and refused answers were seen.
    assert len(calls) >= 5 * len(operations)
    assert any(c < 300 for c in calls) and any(400 <= c < 500 for c in calls)
    print(f"schemathesis: {len(calls)} calls, statuses {sorted(set(calls))}")


def test_fixture_home_is_private(tmp_path: Path) -> None:
    # The service creates its state directory owner-only; keys and database live there.
    from sandboxsec.settings import Settings

    home = Settings(home=tmp_path / "h").ensure_home()
    assert home.stat().st_mode & 0o077 == 0
