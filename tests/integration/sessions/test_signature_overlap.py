"""A proof's signature checked beside the decision lets nothing through (SQLite, PostgreSQL).

``POST /v1/actions`` starts the signature check and decides at once; the decision's
transaction waits for the answer before it commits.  Each case runs with the check beside
the decision and with it first (``dpop_parallel_signature_check`` off), and must answer the
same: a forged proof (every claim right, the signature of another proof by the same key) is
refused with ``dpop_signature_invalid`` and audited as such, whatever the decision would have
been (allow with a grant, approval required, a refusal of the action's own); nothing it asked
for is stored, and its ``jti`` is not used up, so the genuine proof still works once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from tests.conftest import TenantKeys, make_session
from tests.support.sessionkeys import KEYS

BASE = "http://testserver"
PAYMENT = {"amount": "12.00", "currency": "EUR"}


@pytest.fixture(params=[True, False], ids=["beside", "first"])
def settings(request: pytest.FixtureRequest, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("SANDBOXSEC_HOME", str(home))
    yield Settings(home=home, public_url=BASE,
                   dpop_parallel_signature_check=bool(request.param))


def _body(sid: str, action: str, resource: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"session_id": sid, "action": action, "resource": resource,
                       "params": params}).encode()


def _headers(services: Services, tenant: TenantKeys, sid: str, body: bytes, *,
             url: str = BASE + "/v1/actions", jti: str | None = None) -> dict[str, str]:
    key = tenant.keys["agent"]
    over = {"jti": jti} if jti is not None else {}
    proof = KEYS[sid].proof("POST", url, sid, body, services.clock.now(), key, **over)
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json",
            "DPoP": proof}


def _forge(headers: dict[str, str], other: dict[str, str]) -> dict[str, str]:
    """``headers`` with its proof's signature swapped for that of ``other``'s proof (the same
    key, another signing input): well formed, every claim right, the signature wrong."""
    signed, _, _ = headers["DPoP"].rpartition(".")
    return {**headers, "DPoP": signed + "." + other["DPoP"].rpartition(".")[2]}


def _post_forged(client: TestClient, services: Services, tenant: TenantKeys, sid: str,
                 body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """``POST /v1/actions`` of ``body`` with ``headers`` (a genuine proof for it when None)
    whose proof carries the signature of another proof by the session's key."""
    genuine = headers if headers is not None else _headers(services, tenant, sid, body)
    other = _headers(services, tenant, sid, b"{}")
    return client.post("/v1/actions", content=body, headers=_forge(genuine, other))


def _code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def _events(services: Services, tenant: TenantKeys, event: AuditEvent) -> list[Any]:
    return list(services.audit.entries(tenant.id, event=event))


def _approvals(services: Services) -> int:
    with services.db.session() as s:
        return int(s.execute(select(func.count()).select_from(ApprovalRequest)).scalar_one())


def _refused_forged(services: Services, tenant: TenantKeys, r: httpx.Response) -> None:
    assert (r.status_code, _code(r)) == (401, "dpop_signature_invalid"), r.text
    refusals = _events(services, tenant, AuditEvent.SESSION_PROOF_REFUSE)
    assert "dpop_signature_invalid" in json.dumps(refusals)


@pytest.mark.parametrize(("action", "resource", "params", "stores"), [
    ("message", "app:chat", {}, AuditEvent.GRANT_ISSUE),
    ("payment", "payee:acme-gmbh", PAYMENT, AuditEvent.APPROVAL_REQUEST),
])
def test_a_forged_proof_gets_no_decision_and_does_not_use_up_its_jti(
        client: TestClient, services: Services, tenant: TenantKeys, action: str,
        resource: str, params: dict[str, Any], stores: AuditEvent) -> None:
    sid = make_session(services, tenant)
    body = _body(sid, action, resource, params)
    genuine = _headers(services, tenant, sid, body, jti="the-one-jti")
    forged = _post_forged(client, services, tenant, sid, body, genuine)
    _refused_forged(services, tenant, forged)
    assert _events(services, tenant, AuditEvent.POLICY_DECISION) == []
    assert _events(services, tenant, stores) == []
    assert _approvals(services) == 0
    # The forged request never happened: the genuine proof with the same jti works, once.
    ok = client.post("/v1/actions", content=body, headers=genuine)
    assert ok.status_code == 200, ok.text
    assert len(_events(services, tenant, stores)) == 1
    assert _approvals(services) == (1 if stores is AuditEvent.APPROVAL_REQUEST else 0)
    again = client.post("/v1/actions", content=body, headers=genuine)
    assert (again.status_code, _code(again)) == (401, "dpop_replayed")


def test_a_forged_proof_is_refused_as_forged_whatever_the_action_is_refused_for(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    """The decision's own refusals (bad params before the transaction, an ended session
    inside it, with its deny audited there) give way to the signature's."""
    sid = make_session(services, tenant)
    no_currency = _body(sid, "payment", "payee:acme-gmbh", {"amount": "12.00"})
    genuine = _headers(services, tenant, sid, no_currency)
    plain = client.post("/v1/actions", content=no_currency, headers=genuine)
    assert (plain.status_code, _code(plain)) == (400, "action_invalid")
    _refused_forged(services, tenant,
                    _post_forged(client, services, tenant, sid, no_currency))

    ended = make_session(services, tenant, ttl_seconds=60)
    body = _body(ended, "message", "app:chat", {})
    services.clock.advance(120)  # type: ignore[attr-defined]
    _refused_forged(services, tenant, _post_forged(client, services, tenant, ended, body))
    assert _events(services, tenant, AuditEvent.POLICY_DECISION) == []  # deny rolled back
    genuine_late = client.post("/v1/actions", content=body,
                               headers=_headers(services, tenant, ended, body))
    assert (genuine_late.status_code, _code(genuine_late)) == (409, "action_session_expired")


def test_a_forged_proof_for_another_url_is_refused_as_forged(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    """The checks that run while the signature is pending (URL, body, freshness) wait for it
    before they refuse: the reason code is the one of checking the signature first."""
    sid = make_session(services, tenant)
    body = _body(sid, "message", "app:chat", {})
    elsewhere = _headers(services, tenant, sid, body, url=BASE + "/v1/elsewhere")
    _refused_forged(services, tenant,
                    _post_forged(client, services, tenant, sid, body, elsewhere))
    honest = client.post("/v1/actions", content=body, headers=elsewhere)
    assert (honest.status_code, _code(honest)) == (401, "dpop_url_mismatch")


def test_forged_proofs_in_a_row_are_all_refused_and_genuine_ones_still_work(
        client: TestClient, services: Services, tenant: TenantKeys) -> None:
    """After a forged proof the key's proofs are checked before deciding; the answers do
    not change, for forged and genuine proofs alike."""
    sid = make_session(services, tenant)
    for i in range(4):
        body = _body(sid, "message", "app:chat", {"i": i})
        _refused_forged(services, tenant, _post_forged(client, services, tenant, sid, body))
        ok = client.post("/v1/actions", content=body,
                         headers=_headers(services, tenant, sid, body))
        assert ok.status_code == 200, ok.text
    assert len(_events(services, tenant, AuditEvent.POLICY_DECISION)) == 4


def test_after_a_forged_proof_the_keys_next_forgeries_get_no_decision(
        client: TestClient, services: Services, tenant: TenantKeys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first forged proof of a key may cost one decision, computed beside its signature
    check and rolled back; the key's later proofs are checked first, so a forger cannot make
    the service decide (and roll back) once per forged proof."""
    decided: list[str] = []
    decide = services.decisions.request_action

    def counted(*args: Any, **kwargs: Any) -> Any:
        decided.append(kwargs["session_id"])
        return decide(*args, **kwargs)

    monkeypatch.setattr(services.decisions, "request_action", counted)
    sid = make_session(services, tenant)
    for i in range(3):
        body = _body(sid, "message", "app:chat", {"i": i})
        _refused_forged(services, tenant, _post_forged(client, services, tenant, sid, body))
    assert len(decided) <= 1, decided
    body = _body(sid, "message", "app:chat", {"genuine": True})
    ok = client.post("/v1/actions", content=body, headers=_headers(services, tenant, sid, body))
    assert ok.status_code == 200, ok.text
    assert _events(services, tenant, AuditEvent.POLICY_DECISION) != []
