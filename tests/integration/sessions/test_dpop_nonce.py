"""Server nonces in session proofs (RFC 9449 section 8) over HTTP, SQLite and PostgreSQL.

With ``dpop_require_nonce`` the service answers a proof without its nonce with 401
``use_dpop_nonce``, a fresh ``DPoP-Nonce`` and ``WWW-Authenticate: DPoP
error="use_dpop_nonce"``; a nonce it never issued is ``dpop_nonce_invalid``; an expired one is
``use_dpop_nonce`` again.  The client distribution (sync and async, and the reference
sandbox's agent built on it) keeps the last nonce, puts it in its proofs and, asked for a new
one, retries once with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from sandboxsec_client import ApiError, AsyncAgentClient

from sandboxsec.api.app import create_app
from sandboxsec.audit.events import AuditEvent
from sandboxsec.clock import FixedClock
from sandboxsec.sandbox.agent import AgentClient
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_session, make_tenant
from tests.support.sessionkeys import KEYS, SoftSessionKey

BASE = "http://testserver"
# The client sends its per-request timeout; starlette's test client warns about it (in process,
# there is nothing to time out).
_TIMEOUT_WARNING = "ignore:You should not use the 'timeout' argument"
LIFETIME = 120


@pytest.fixture
def nonce_services(settings: Settings, database: Database,
                   clock: FixedClock) -> Iterator[Services]:
    svc = Services(settings.model_copy(update={"dpop_require_nonce": True,
                                               "dpop_nonce_lifetime_seconds": LIFETIME}),
                   clock=clock, db=database)
    yield svc
    svc.close()


@pytest.fixture
def raw(nonce_services: Services) -> Iterator[TestClient]:
    # No automatic proofs: each test writes its own.
    with TestClient(create_app(nonce_services), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def agent(nonce_services: Services) -> TenantKeys:
    return make_tenant(nonce_services, "nonce-tenant")


def _act(client: TestClient, services: Services, tenant: TenantKeys, sid: str,
         **over: str) -> httpx.Response:
    body = json.dumps({"session_id": sid, "action": "message", "resource": "app:chat",
                       "params": {}}).encode()
    key = tenant.keys["agent"]
    proof = KEYS[sid].proof("POST", BASE + "/v1/actions", sid, body, services.clock.now(),
                            key, **over)
    return client.post("/v1/actions", content=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "DPoP": proof})


def _refused(r: httpx.Response, code: str) -> str:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == code
    assert r.headers["WWW-Authenticate"] == 'DPoP error="use_dpop_nonce", algs="ES256"'
    return r.headers["DPoP-Nonce"]


def test_proof_without_nonce_is_answered_with_one_that_then_works(
        raw: TestClient, nonce_services: Services, agent: TenantKeys) -> None:
    sid = make_session(nonce_services, agent)
    nonce = _refused(_act(raw, nonce_services, agent, sid), "use_dpop_nonce")
    ok = _act(raw, nonce_services, agent, sid, nonce=nonce)
    assert ok.status_code == 200, ok.text
    assert ok.headers["DPoP-Nonce"]  # the next one, handed out with every proven answer
    refusals = nonce_services.audit.entries(agent.id, event=AuditEvent.SESSION_PROOF_REFUSE)
    assert "use_dpop_nonce" in json.dumps(refusals) and len(refusals) == 1


def test_forged_nonce_is_refused_with_its_own_code(
        raw: TestClient, nonce_services: Services, agent: TenantKeys) -> None:
    sid = make_session(nonce_services, agent)
    good = _refused(_act(raw, nonce_services, agent, sid), "use_dpop_nonce")
    forged = good[:-6] + ("AAAAAA" if not good.endswith("AAAAAA") else "BBBBBA")
    fresh = _refused(_act(raw, nonce_services, agent, sid, nonce=forged), "dpop_nonce_invalid")
    assert _act(raw, nonce_services, agent, sid, nonce=fresh).status_code == 200


def test_expired_nonce_asks_for_a_new_one(
        raw: TestClient, nonce_services: Services, agent: TenantKeys,
        clock: FixedClock) -> None:
    sid = make_session(nonce_services, agent)
    nonce = _refused(_act(raw, nonce_services, agent, sid), "use_dpop_nonce")
    clock.advance(LIFETIME + 1)  # the proof's own iat is fresh: only the nonce is old
    fresh = _refused(_act(raw, nonce_services, agent, sid, nonce=nonce), "use_dpop_nonce")
    assert fresh != nonce
    assert _act(raw, nonce_services, agent, sid, nonce=fresh).status_code == 200


def _counting(raw: TestClient) -> list[int]:
    sent: list[int] = []
    raw.event_hooks["response"].append(lambda r: sent.append(r.status_code))
    return sent


@pytest.mark.filterwarnings(_TIMEOUT_WARNING)
def test_client_retries_once_with_the_nonce_it_is_sent(
        raw: TestClient, nonce_services: Services, agent: TenantKeys) -> None:
    sid = make_session(nonce_services, agent)
    sent = _counting(raw)
    client = AgentClient(BASE, agent.keys["agent"], http=raw, clock=nonce_services.clock)
    client.prover.attach(KEYS[sid], sid)
    assert client.ask(sid, "message", "app:chat", {}).decision == "allow"
    assert sent == [401, 200]
    assert client.ask(sid, "message", "app:chat", {}).decision == "allow"
    assert sent == [401, 200, 200]  # the nonce of the last answer is used: no retry
    # Every session-scoped route carries it: a trajectory write and an approval read.
    assert client.record(sid, "observation", b"x").record_id.startswith("tr_")
    assert sent == [401, 200, 200, 201]


@pytest.mark.filterwarnings(_TIMEOUT_WARNING)
def test_client_asks_again_when_its_nonce_expired_and_shares_it_with_a_worker(
        raw: TestClient, nonce_services: Services, agent: TenantKeys,
        clock: FixedClock) -> None:
    sid = make_session(nonce_services, agent)
    sent = _counting(raw)
    client = AgentClient(BASE, agent.keys["agent"], http=raw, clock=nonce_services.clock)
    client.prover.attach(KEYS[sid], sid)
    assert client.ask(sid, "message", "app:chat", {}).decision == "allow"
    old = client.prover.nonce
    clock.advance(LIFETIME + 1)
    assert client.ask(sid, "message", "app:chat", {}).decision == "allow"
    assert sent == [401, 200, 401, 200] and client.prover.nonce != old
    # Another worker of the same agent starts from the nonce it is handed: no refusal.
    worker = AgentClient(BASE, agent.keys["agent"], http=raw, clock=nonce_services.clock)
    worker.use_session(client)
    assert worker.ask(sid, "message", "app:chat", {}).decision == "allow"
    assert sent[4:] == [200]


@pytest.mark.filterwarnings(_TIMEOUT_WARNING)
def test_client_recovers_from_a_forged_nonce_but_not_from_another_refusal(
        raw: TestClient, nonce_services: Services, agent: TenantKeys) -> None:
    sid = make_session(nonce_services, agent)
    sent = _counting(raw)
    client = AgentClient(BASE, agent.keys["agent"], http=raw, clock=nonce_services.clock)
    client.prover.attach(KEYS[sid], sid)
    client.prover.nonce = "A" * 32  # a nonce this service never issued
    # dpop_nonce_invalid comes with the use_dpop_nonce challenge and a fresh nonce: one resend.
    assert client.ask(sid, "message", "app:chat", {}).decision == "allow"
    assert sent == [401, 200]
    refusals = nonce_services.audit.entries(agent.id, event=AuditEvent.SESSION_PROOF_REFUSE)
    assert "dpop_nonce_invalid" in json.dumps(refusals)
    # A stranger's key is refused on the key (checked before the nonce): not resent.
    thief = AgentClient(BASE, agent.keys["agent"], http=raw, clock=nonce_services.clock)
    thief.prover.attach(SoftSessionKey(), sid)
    with pytest.raises(ApiError) as stolen:
        thief.ask(sid, "message", "app:chat", {})
    assert stolen.value.code == "dpop_key_mismatch"
    assert sent[2:] == [401]
    # Given a valid nonce, the stranger's proof is still refused on the key, with no resend.
    thief.prover.nonce = client.prover.nonce
    with pytest.raises(ApiError) as again:
        thief.ask(sid, "message", "app:chat", {})
    assert again.value.code == "dpop_key_mismatch" and sent[3:] == [401]


def test_async_client_retries_once_with_the_nonce_it_is_sent(
        nonce_services: Services, agent: TenantKeys) -> None:
    sid = make_session(nonce_services, agent)
    sent: list[int] = []

    async def count(r: httpx.Response) -> None:
        sent.append(r.status_code)

    async def run() -> None:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(nonce_services)),
            event_hooks={"response": [count]})
        async with AsyncAgentClient(BASE, agent.keys["agent"], http=http,
                                    session_key=KEYS[sid], session_id=sid) as client:
            assert client.prover is not None
            client.prover.now = lambda: nonce_services.clock.now().timestamp()
            assert (await client.ask(sid, "message", "app:chat", {})).decision == "allow"
            assert (await client.ask(sid, "message", "app:chat", {})).decision == "allow"
        await http.aclose()

    anyio.run(run)
    assert sent == [401, 200, 200]


def test_nonces_are_off_by_default(client: TestClient, services: Services,
                                   tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    r = _act(client, services, tenant, sid)
    assert r.status_code == 200, r.text
    assert "DPoP-Nonce" not in r.headers
