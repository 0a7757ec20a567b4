"""Fixtures of the people tests: enrolled people with software passkeys, signed in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.api.routes.people import COOKIE
from sandboxsec.sandbox.passkey import SoftPasskey
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.policy.conftest import make_session

ORIGIN = "http://localhost:8000"


@dataclass
class Enrolled:
    """A person with a passkey, and (after ``signin``) a sign-in cookie."""

    client: TestClient
    person_id: str
    handle: str
    passkey: SoftPasskey
    token: str = ""

    def headers(self, origin: str = ORIGIN) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.token}", "Origin": origin}

    def signin(self) -> Any:
        c = self.client
        opts = c.post("/v1/signin/options", headers={"Origin": ORIGIN}).json()
        r = c.post("/v1/signin", headers={"Origin": ORIGIN}, json={
            "challenge_id": opts["challenge_id"], "credential": self.passkey.get(opts)})
        assert r.status_code == 200, r.text
        self.token = r.cookies[COOKIE]
        c.cookies.clear()  # each person sends their own cookie header
        return r

    def get(self, path: str) -> Any:
        return self.client.get(path, headers=self.headers())

    def challenge(self, approval_id: str, decision: str = "approve") -> Any:
        return self.client.post(f"/v1/me/approvals/{approval_id}/challenge",
                                headers=self.headers(), json={"decision": decision})

    def decide(self, approval_id: str, decision: str = "approve", *,
               params_hash: str | None = None, challenge: dict[str, Any] | None = None,
               credential: dict[str, Any] | None = None, **get_kwargs: Any) -> Any:
        if challenge is None:
            r = self.challenge(approval_id, decision)
            assert r.status_code == 200, r.text
            challenge = r.json()
        if params_hash is None:
            params_hash = self.get(f"/v1/me/approvals/{approval_id}").json()["params_hash"]
        cred = credential if credential is not None else self.passkey.get(challenge,
                                                                           **get_kwargs)
        return self.client.post(f"/v1/me/approvals/{approval_id}/{decision}",
                                headers=self.headers(), json={
                                    "challenge_id": challenge["challenge_id"],
                                    "params_hash": params_hash, "credential": cred})


def enrol(client: TestClient, tenant: TenantKeys, handle: str,
          groups: list[str] | None = None) -> Enrolled:
    """Create a person and register a software passkey through the enrolment link."""
    r = client.post("/v1/people", headers=tenant.headers("admin"),
                    json={"name": handle.title(), "handle": handle, "groups": groups or []})
    assert r.status_code == 201, r.text
    token = r.json()["enrolment"]["enrolment_path"].rsplit("/", 1)[1]
    opts = client.post(f"/v1/enroll/{token}/options", headers={"Origin": ORIGIN}).json()
    passkey = SoftPasskey(rp_id="localhost", origin=ORIGIN)
    reg = client.post(f"/v1/enroll/{token}/register", headers={"Origin": ORIGIN}, json={
        "challenge_id": opts["challenge_id"], "credential": passkey.create(opts)})
    assert reg.status_code == 201, reg.text
    return Enrolled(client, r.json()["person_id"], handle, passkey)


EnrolFn = Callable[..., Enrolled]


@pytest.fixture
def people(client: TestClient, tenant: TenantKeys) -> EnrolFn:
    """``people(handle, groups=[...])``: an enrolled, signed-in person of ``tenant``."""

    def _make(handle: str, groups: list[str] | None = None) -> Enrolled:
        person = enrol(client, tenant, handle, groups)
        person.signin()
        return person

    return _make


def owned_session(services: Services, client: TestClient, tenant: TenantKeys,
                  owner: Enrolled) -> str:
    """A live session whose owner the admin set to ``owner``."""
    sid = make_session(services, tenant)
    r = client.put(f"/v1/sessions/{sid}/owner", headers=tenant.headers("admin"),
                   json={"person_id": owner.person_id})
    assert r.status_code == 200, r.text
    return sid


def request_payment(client: TestClient, tenant: TenantKeys, sid: str,
                    amount: str = "125.50") -> dict[str, Any]:
    r = client.post("/v1/actions", headers=tenant.headers("agent"), json={
        "session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
        "params": {"amount": amount, "currency": "EUR", "payee": "acme-gmbh"}})
    assert r.status_code == 200 and r.json()["decision"] == "approval_required", r.text
    return dict(r.json())
