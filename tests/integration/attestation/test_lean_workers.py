"""The lean attestation path on a real `sandboxsec serve --workers 2`, on one SQLite file and on
one PostgreSQL database: a stateless nonce is consumed once across workers; an AK unbound
behind the workers' backs, and an EK revoked by editing the trust directory, are refused at
once by both workers, whatever they have cached."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete

from sandboxsec.attestation.models import BoundAk
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.support.faults import Deployment, Tenant, Trust, running
from tests.support.softtpm import SoftAk, marshal_quote, sign_quote, soft_activate

CONCURRENT = 12


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _bind(c: httpx.Client, tenant: Tenant, trust: Trust, ak: SoftAk) -> None:
    ch = c.post("/v1/attestation/ak/challenge", headers=tenant.h("agent"), json={
        "ak_public": _b64(ak.public), "ek_certificate": _b64(trust.ek.der)}).json()
    secret = soft_activate(trust.ek_key, ak.name, base64.b64decode(ch["credential_blob"]),
                           base64.b64decode(ch["encrypted_secret"]))
    r = c.post("/v1/attestation/ak/activate", headers=tenant.h("agent"),
               json={"credential_id": ch["credential_id"], "secret": _b64(secret)})
    assert r.status_code == 200, r.text


def _body(trust: Trust, ak: SoftAk, nonce: bytes, tick: int) -> dict[str, Any]:
    q = marshal_quote(nonce, {"sha256": trust.pcrs}, clock=tick)
    return {"nonce": _b64(nonce), "quote": _b64(q), "signature": _b64(sign_quote(ak, q)),
            "ak_public": _b64(ak.public),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in trust.pcrs.items()}},
            "event_log": _b64(trust.event_log), "image_manifest": trust.manifest}


async def _burst(base: str, headers: dict[str, str], body: dict[str, Any],
                 n: int) -> list[httpx.Response]:
    # One connection per request, so the kernel spreads them over both workers' accepts.
    raw = json.dumps(body)

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            return await c.post("/v1/attestation/verify", content=raw,
                                headers={**headers, "content-type": "application/json"})

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _nonce(c: httpx.Client, tenant: Tenant) -> bytes:
    r = c.post("/v1/attestation/challenge", headers=tenant.h("agent"), json={})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["nonce"])


@pytest.mark.timeout(240)
def test_nonce_consumed_once_and_unbinding_seen_by_both_workers(
    tmp_path: Path, database_url: str | None,
) -> None:
    deployment = Deployment(tmp_path / "home", database_url=database_url)
    (tenant,) = deployment.create_tenants("lean-bank")
    trust = deployment.trust
    ak = SoftAk()
    with running(deployment, workers=2) as server, \
            httpx.Client(base_url=server.base, timeout=30) as c:
        _bind(c, tenant, trust, ak)
        tick = 10_000
        # 1. The same evidence (one nonce) sent at once over many connections: one verdict
        #    affirms, every other one is a replay, on whichever worker it lands.
        outcomes: Counter[str] = Counter()
        for _ in range(3):
            tick += 1
            body = _body(trust, ak, _nonce(c, tenant), tick)
            answers = asyncio.run(_burst(server.base, tenant.h("agent"), body, CONCURRENT))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            for r in answers:
                out = r.json()
                outcomes[out["status"] if out["status"] == "affirming"
                         else ",".join(f["code"] for f in out["failures"])] += 1
        assert outcomes == {"affirming": 3, "attestation_nonce_replayed": 3 * (CONCURRENT - 1)}
        # 2. Both workers now hold the binding in their caches (many verdicts, many
        #    connections).  Unbind the AK in the database.
        for _ in range(4):
            tick += 1
            answers = asyncio.run(_burst(server.base, tenant.h("agent"),
                                         _body(trust, ak, _nonce(c, tenant), tick), 1))
            assert answers[0].json()["status"] == "affirming"
        db = Database(Settings(home=deployment.home, database_url=database_url)
                      .resolved_database_url())
        with db.session() as s:
            s.execute(delete(BoundAk))
        db.dispose()
        # 3. Every later verdict, on either worker, is refused: no cache decided.
        refused: Counter[str] = Counter()
        for _ in range(4):
            bodies = []
            for _ in range(4):
                tick += 1
                bodies.append(_body(trust, ak, _nonce(c, tenant), tick))

            async def each(batch: list[dict[str, Any]] = bodies) -> list[httpx.Response]:
                lists = await asyncio.gather(*(_burst(server.base, tenant.h("agent"), b, 1)
                                               for b in batch))
                return [r for rs in lists for r in rs]

            for r in asyncio.run(each()):
                out = r.json()
                refused[",".join(f["code"] for f in out["failures"]) or out["status"]] += 1
        assert refused == {"ak_not_bound": 16}, refused


def _verdicts(base: str, c: httpx.Client, tenant: Tenant, trust: Trust, aks: list[SoftAk],
              tick: int) -> Counter[str]:
    """One verdict per AK, sent at once over separate connections (both workers); each AK
    quotes once per call, so no two of its quotes race (a late clock is rightly refused)."""
    bodies = [_body(trust, ak, _nonce(c, tenant), tick) for ak in aks]

    async def each() -> list[httpx.Response]:
        lists = await asyncio.gather(*(_burst(base, tenant.h("agent"), b, 1) for b in bodies))
        return [r for rs in lists for r in rs]

    seen: Counter[str] = Counter()
    for r in asyncio.run(each()):
        out = r.json()
        seen[",".join(f["code"] for f in out["failures"]) or out["status"]] += 1
    return seen


@pytest.mark.timeout(240)
def test_a_revocation_file_takes_effect_at_once_on_both_workers(
    tmp_path: Path, database_url: str | None,
) -> None:
    deployment = Deployment(tmp_path / "home", database_url=database_url)
    (tenant,) = deployment.create_tenants("revoke-bank")
    trust = deployment.trust
    aks = [SoftAk() for _ in range(6)]
    revoked = deployment.home / "trust" / "revocations" / "revoked.txt"
    with running(deployment, workers=2) as server, \
            httpx.Client(base_url=server.base, timeout=30) as c:
        for ak in aks:
            _bind(c, tenant, trust, ak)

        def phase(first_tick: int) -> Counter[str]:
            return (_verdicts(server.base, c, tenant, trust, aks, first_tick)
                    + _verdicts(server.base, c, tenant, trust, aks, first_tick + 1))

        # Both workers have verified (EK chain and binding cached).
        assert phase(20_000) == {"affirming": 12}
        # The operator revokes the EK certificate by editing a file: no restart, no signal.
        revoked.parent.mkdir(parents=True, exist_ok=True)
        revoked.write_text(f"cert-sha256:{hashlib.sha256(trust.ek.der).hexdigest()}\n")
        assert phase(20_100) == {"cert_revoked": 12}
        # Lifting the revocation takes effect the same way.
        revoked.write_text("# nothing revoked\n")
        assert phase(20_200) == {"affirming": 12}
