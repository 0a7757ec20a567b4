"""The key gate: authentication and the per-key rate limit come before the body is read."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from sandboxsec.api.app import create_app
from sandboxsec.api.gate import RateLimiter
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.support.serve import bound_socket, in_thread


def test_rate_limiter_token_bucket() -> None:
    now = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k") == pytest.approx(0.5)
    assert limiter.take("other") == 0.0  # per key
    now[0] += 0.5
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0
    assert RateLimiter(0, 0).take("k") == 0.0  # 0: no limit


def test_rate_limited_with_retry_after(settings: Settings, database: Database) -> None:
    limited = settings.model_copy(update={"rate_limit_per_second": 0.5, "rate_limit_burst": 3})
    services = Services(limited, db=database)
    try:
        tenant = make_tenant(services, "limited")
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            statuses = [client.get("/v1/tenant", headers=tenant.headers("agent")).status_code
                        for _ in range(3)]
            assert statuses == [200, 200, 200]
            r = client.get("/v1/tenant", headers=tenant.headers("agent"))
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
            assert int(r.headers["retry-after"]) >= 1
            # Refused before the body: a POST over the rate is refused the same way.
            r = client.post("/v1/actions", json={}, headers=tenant.headers("agent"))
            assert r.status_code == 429 and "retry-after" in r.headers
            # Another key of the same tenant has its own bucket.
            assert client.get("/v1/tenant",
                              headers=tenant.headers("admin")).status_code == 200
    finally:
        services.close()


@pytest.fixture
def live(settings: Settings, sqlite_database: Database) -> Iterator[tuple[int, TenantKeys]]:
    services = Services(settings, db=sqlite_database)
    tenant = make_tenant(services, "gate")
    sock, port = bound_socket()
    try:
        with in_thread(create_app(services), sock):
            yield port, tenant
    finally:
        services.close()


def _head_only(port: int, auth: str | None) -> bytes:
    """Announce a 10 MiB body, send none of it, and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = ("POST /v1/actions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {10 << 20}\r\n")
        if auth:
            head += f"Authorization: {auth}\r\n"
        s.sendall((head + "\r\n").encode())
        try:
            return s.recv(4096)
        except TimeoutError:
            return b"(no answer before the body)"


def test_no_body_is_read_before_the_key_is_checked(live: tuple[int, TenantKeys]) -> None:
    port, _tenant = live
    for auth in (None, "Bearer ssk_0000000000000000_" + "A" * 43, "Basic x"):
        answer = _head_only(port, auth)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert b"api_key_invalid" in answer
