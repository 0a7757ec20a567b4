"""A session proof is accepted once across worker processes: `sandboxsec serve --workers 2` on
one SQLite file and on one PostgreSQL database, the same proof sent many times at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from sandboxsec.ids import new_id
from sandboxsec.sessions.models import AgentSession
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.support.faults import Deployment, running
from tests.support.sessionkeys import SoftSessionKey

ROUNDS = 6
CONCURRENT = 12


async def _burst(base: str, path: str, headers: dict[str, str]) -> list[httpx.Response]:
    # One connection per request, so the kernel spreads them over both workers' accepts.
    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            return await c.get(path, headers=headers)

    return list(await asyncio.gather(*(one() for _ in range(CONCURRENT))))


@pytest.mark.timeout(240)
def test_the_same_proof_wins_once_across_two_workers(tmp_path: Path,
                                                     database_url: str | None) -> None:
    deployment = Deployment(tmp_path / "home", database_url=database_url)
    (tenant,) = deployment.create_tenants("replay-bank")
    key = SoftSessionKey()
    with running(deployment, workers=2) as server:
        # The session row as an attested start would write it (the attested start itself is
        # tested against swtpm in test_bound_sessions.py); this test is about the store.
        db = Database(Settings(home=deployment.home, database_url=database_url)
                      .resolved_database_url())
        sid = new_id("ses")
        now = datetime.now(UTC)
        with db.session() as s:
            s.add(AgentSession(id=sid, tenant_id=tenant.id, attested=True, created_at=now,
                               expires_at=now + timedelta(hours=1), key_thumbprint=key.jkt))
        db.dispose()
        path = f"/v1/sessions/{sid}"
        outcomes: Counter[str] = Counter()
        for _ in range(ROUNDS):
            proof = key.proof("GET", server.base + path, sid, b"", datetime.now(UTC),
                              tenant.keys["agent"])
            answers = asyncio.run(_burst(server.base, path,
                                         {**tenant.h("agent"), "DPoP": proof}))
            won = [r for r in answers if r.status_code == 200]
            assert len(won) == 1, [(r.status_code, r.text[:80]) for r in answers]
            for r in answers:
                outcomes["ok" if r.status_code == 200 else r.json()["error"]["code"]] += 1
        assert outcomes == {"ok": ROUNDS, "dpop_replayed": ROUNDS * (CONCURRENT - 1)}
        # A fresh proof still works after all that (the store is not stuck).
        fresh = key.proof("GET", server.base + path, sid, b"", datetime.now(UTC),
                          tenant.keys["agent"])
        r = httpx.get(server.base + path, headers={**tenant.h("agent"), "DPoP": fresh})
        assert r.status_code == 200, r.text
