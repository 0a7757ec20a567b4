"""A session proof is used up in the transaction of what its request does (SQLite, PostgreSQL).

The single-use mark of ``POST /v1/actions`` and of trajectory writes commits with the decision
or the record: a replay is refused and nothing is done twice; a request refused before it
commits leaves its proof unused (the request never happened); the same proof sent from many
threads at once is carried out once.
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi.testclient import TestClient

from sandboxsec.audit.events import AuditEvent
from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_session
from tests.support.sessionkeys import KEYS

BASE = "http://testserver"


def _signed(services: Services, tenant: TenantKeys, sid: str, path: str,
            payload: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(payload).encode()
    key = tenant.keys["agent"]
    proof = KEYS[sid].proof("POST", BASE + path, sid, body, services.clock.now(), key)
    return body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                  "DPoP": proof}


def _code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def _decisions(services: Services, tenant: TenantKeys) -> int:
    return len(services.audit.entries(tenant.id, event=AuditEvent.POLICY_DECISION))


def test_an_action_uses_its_proof_once(client: TestClient, services: Services,
                                       tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    body, headers = _signed(services, tenant, sid, "/v1/actions", {
        "session_id": sid, "action": "message", "resource": "app:chat", "params": {}})
    first = client.post("/v1/actions", content=body, headers=headers)
    assert first.status_code == 200, first.text
    again = client.post("/v1/actions", content=body, headers=headers)
    assert (again.status_code, _code(again)) == (401, "dpop_replayed")
    assert _decisions(services, tenant) == 1


def test_a_request_refused_before_it_commits_leaves_its_proof_unused(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    body, headers = _signed(services, tenant, sid, "/v1/actions", {
        "session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
        "params": {"amount": "12.00"}})  # no currency: refused before any write
    for _ in range(2):
        r = client.post("/v1/actions", content=body, headers=headers)
        assert (r.status_code, _code(r)) == (400, "action_invalid"), r.text
    assert _decisions(services, tenant) == 0


def test_a_trajectory_write_uses_its_proof_once(client: TestClient, services: Services,
                                                tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    path = f"/v1/sessions/{sid}/trajectory"
    body, headers = _signed(services, tenant, sid, path, {
        "kind": "message", "data": base64.b64encode(b"hello").decode(), "meta": {}})
    assert client.post(path, content=body, headers=headers).status_code == 201
    again = client.post(path, content=body, headers=headers)
    assert (again.status_code, _code(again)) == (401, "dpop_replayed")
    listed = client.get(path, headers=tenant.headers("admin"))
    assert listed.status_code == 200 and len(listed.json()["records"]) == 1


def test_the_same_proof_sent_at_once_is_carried_out_once(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    # One action first, so the tenant's keys exist before the burst (their first creation
    # is not what this test is about).
    warm_body, warm = _signed(services, tenant, sid, "/v1/actions", {
        "session_id": sid, "action": "message", "resource": "app:chat", "params": {"n": "0"}})
    assert client.post("/v1/actions", content=warm_body, headers=warm).status_code == 200
    body, headers = _signed(services, tenant, sid, "/v1/actions", {
        "session_id": sid, "action": "message", "resource": "app:chat", "params": {}})
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(
            lambda _: client.post("/v1/actions", content=body, headers=headers), range(6)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 401, 401, 401, 401, 401], [r.text for r in answers]
    assert {_code(r) for r in answers if r.status_code == 401} == {"dpop_replayed"}
    assert _decisions(services, tenant) == 2
