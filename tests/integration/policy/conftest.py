"""Fixtures of the policy and approval tests: live agent sessions and small API helpers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.ids import new_id
from sandboxsec.policy.engine import bundled_default_policy
from sandboxsec.services import Services
from sandboxsec.sessions.models import AgentSession
from tests.conftest import TenantKeys
from tests.support.sessionkeys import new_key

PAYMENT = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh",
           "iban": "DE89370400440532013000"}

#: The default policy with its person-signed routes opened to approver API keys: the machine
#: path these tests exercise (person-signed approvals are tested in tests/integration/people).
KEY_APPROVAL_POLICY = bundled_default_policy().replace(", owner, 1, passkey", ", anyone, 1, key")


def allow_key_approvals(services: Services, tenant: TenantKeys) -> None:
    """Install :data:`KEY_APPROVAL_POLICY` for ``tenant`` (as its admin)."""
    from sandboxsec.principal import Principal, Role

    admin = Principal(tenant.id, tenant.key_ids["admin"], Role.ADMIN)
    services.policy.replace_policy(admin, KEY_APPROVAL_POLICY)


def make_session(services: Services, tenant: TenantKeys, *, attested: bool = True,
                 ttl: float = 3600, image: str = "agent-runtime:1.4") -> str:
    """An agent session row, as the sessions domain would store it after attestation."""
    now = services.clock.now()
    sid = new_id("ses")
    with services.db.session() as s:
        s.add(AgentSession(
            id=sid, tenant_id=tenant.id, image_name=image,
            image_digest="sha256:" + "ab" * 32, ak_name="000b" + "cd" * 32, attested=attested,
            created_by=tenant.key_ids["agent"], created_at=now,
            expires_at=now + timedelta(seconds=ttl), key_thumbprint=new_key(sid).jkt,
        ))
    return sid


@pytest.fixture
def session_id(services: Services, tenant: TenantKeys) -> str:
    """A live, attested session of ``tenant``."""
    return make_session(services, tenant)


ActFn = Callable[..., Any]


@pytest.fixture
def act(client: TestClient, tenant: TenantKeys, session_id: str) -> ActFn:
    """``act(action, resource, params, ...)`` posts to /v1/actions as tenant's agent."""

    def _act(action: str = "payment", resource: str = "payee:acme-gmbh",
             params: dict[str, Any] | None = None, *, sid: str | None = None,
             who: TenantKeys | None = None, role: str = "agent") -> Any:
        body = {"session_id": sid or session_id, "action": action, "resource": resource,
                "params": PAYMENT if params is None else params}
        return client.post("/v1/actions", json=body, headers=(who or tenant).headers(role))

    return _act
