"""The people's routes carry no API key, yet nothing reaches their bodies unchecked: the
person gate refuses a foreign origin, a dead enrolment link, a missing or forged sign-in
cookie and a caller over its rate before one byte of the body is read, and their bodies have
a small limit of their own."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from sandboxsec.api.app import create_app
from sandboxsec.api.gate import person_route
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.integration.people.conftest import ORIGIN
from tests.support.serve import bound_socket, in_thread

ELSEWHERE = "https://evil.example"


def test_which_paths_the_person_gate_takes() -> None:
    assert person_route("/v1/enroll/enr_x/options") == ("enrol", "enr_x")
    assert person_route("/v1/enroll/enr_x/register") == ("enrol", "enr_x")
    assert person_route("/v1/signin") == ("signin", None)
    assert person_route("/v1/signin/options") == ("signin", None)
    assert person_route("/v1/signout") == ("signin", None)
    assert person_route("/v1/me") == ("me", None)
    assert person_route("/v1/me/approvals/apr_1/approve") == ("me", None)
    # Everything else keeps the API key gate, including look-alikes.
    for path in ("/v1/metrics", "/v1/meh", "/v1/signins", "/v1/enroll/enr_x/other",
                 "/v1/enroll/enr_x/register/more", "/v1/people", "/v1/approvals/apr_1/approve",
                 "/v1/signin/options/x"):
        assert person_route(path) is None, path


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


def _head_only(port: int, path: str, headers: dict[str, str], size: int = 10 << 20) -> bytes:
    """Announce a large body, send none of it, and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n")
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall((head + "\r\n").encode())
        try:
            return s.recv(4096)
        except TimeoutError:
            return b"(no answer before the body)"


def test_nothing_reads_a_body_before_the_person_gate(live: tuple[int, TenantKeys]) -> None:
    port, _tenant = live
    cases = [
        # no origin, or another site's: no sign-in, enrolment or decision from its pages
        ("/v1/signin", {}, b"403", b"origin_forbidden"),
        ("/v1/signin/options", {"Origin": ELSEWHERE}, b"403", b"origin_forbidden"),
        ("/v1/enroll/enr_x/register", {"Origin": ELSEWHERE}, b"403", b"origin_forbidden"),
        # (a signed-in person's call from another site: test_passkey_approvals.py)
        # a link that is not live
        ("/v1/enroll/enr_" + "A" * 43 + "/register", {"Origin": ORIGIN}, b"404",
         b"enrolment_invalid"),
        ("/v1/enroll/nonsense/options", {"Origin": ORIGIN}, b"404", b"enrolment_invalid"),
        # no sign-in, a forged one, or an API key where a person must be signed in
        ("/v1/me/approvals/apr_x/approve", {"Origin": ORIGIN}, b"401", b"signin_required"),
        ("/v1/me/approvals/apr_x/challenge", {"Origin": ORIGIN,
                                              "Cookie": "sandboxsec_person=sps_" + "B" * 43},
         b"401", b"signin_required"),
        ("/v1/me/approvals/apr_x/deny", {"Origin": ORIGIN, "Authorization": "Bearer ssk_x"},
         b"401", b"signin_required"),
        # the right origin, but a body far over the people's limit
        ("/v1/signin", {"Origin": ORIGIN}, b"413", b"payload_too_large"),
    ]
    for path, headers, status, code in cases:
        answer = _head_only(port, path, headers)
        assert answer.startswith(b"HTTP/1.1 " + status), (path, answer[:300])
        assert code in answer, (path, answer[:300])


def test_the_people_routes_have_a_small_body_limit(client: TestClient) -> None:
    big = {"challenge_id": "chl_x", "credential": {"id": "x" * (70 * 1024)}}
    r = client.post("/v1/signin", headers={"Origin": ORIGIN}, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_passkey_routes_are_rate_limited_per_address(settings: Settings,
                                                     database: Database) -> None:
    limited = settings.model_copy(update={"passkey_rate_limit_per_second": 0.01,
                                          "passkey_rate_limit_burst": 3})
    services = Services(limited, db=database)
    try:
        tenant = make_tenant(services, "limited")
        with TestClient(create_app(services), raise_server_exceptions=False) as client:
            page = {"Origin": ORIGIN}
            statuses = [client.post("/v1/signin/options", headers=page).status_code
                        for _ in range(3)]
            assert statuses == [200, 200, 200]
            # Over the rate: refused before anything else, sign-in cookie or not.
            for path in ("/v1/signin/options", "/v1/signin", "/v1/me",
                         "/v1/enroll/enr_x/options"):
                r = client.post(path, headers=page, json={})
                assert r.status_code == 429, (path, r.text)
                assert r.json()["error"]["code"] == "rate_limited"
                assert int(r.headers["retry-after"]) >= 1
            # The API-key routes keep their own, per-key limit.
            assert client.get("/v1/tenant", headers=tenant.headers("admin")).status_code == 200
    finally:
        services.close()


def _new_link(client: TestClient, tenant: TenantKeys, handle: str) -> tuple[str, str]:
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": handle.title(), "handle": handle})
    assert r.status_code == 201, r.text
    return r.json()["person_id"], r.json()["enrolment"]["enrolment_path"].rsplit("/", 1)[1]


def test_a_dead_enrolment_link_is_refused_before_its_body(
        client: TestClient, services: Services, tenant: TenantKeys, clock: FixedClock) -> None:
    page = {"Origin": ORIGIN}
    # A live link: the body is read (and this one refused as malformed).
    bob, token = _new_link(client, tenant, "bob")
    r = client.post(f"/v1/enroll/{token}/register", headers=page, content=b"{not json")
    assert r.status_code in (400, 422) and r.json()["error"]["code"] != "enrolment_invalid"
    # Bob is disabled: his link dies with him, and the same body now gets the link's refusal
    # (it was never read).
    assert client.delete(f"/v1/people/{bob}", headers=tenant.headers("admin")).status_code == 200
    r = client.post(f"/v1/enroll/{token}/register", headers=page, content=b"{not json")
    assert r.status_code == 404 and r.json()["error"]["code"] == "enrolment_invalid"
    # An expired link, the same.
    _carol, token = _new_link(client, tenant, "carol")
    clock.advance(services.settings.enrolment_ttl_seconds + 1)
    r = client.post(f"/v1/enroll/{token}/options", headers=page)
    assert r.status_code == 404 and r.json()["error"]["code"] == "enrolment_invalid"
