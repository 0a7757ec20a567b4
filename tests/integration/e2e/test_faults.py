"""Faults under load against the real service (``sandboxsec serve --workers 2``).

Each test runs a small load of simulated agents and approvers (see ``faults_support.py``),
breaks something a real deployment loses (the server process, the database, the HSM, the
network manners of a client), and then proves through the public API and the offline audit
verifier that nothing acknowledged was lost, nothing was allowed that should not have been,
and the service came back.  ``make soak`` (``SANDBOXSEC_SOAK=1``) runs longer variants.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.integration.e2e.faults_support import (
    SOFTHSM_MODULE,
    Api,
    Deployment,
    GrantAck,
    Ledger,
    LoadConfig,
    Sandbox,
    Server,
    Tenant,
    check_ledger,
    run_load_async,
    running,
    summary,
)
from tests.pgcluster import PgCluster

SOAK = os.environ.get("SANDBOXSEC_SOAK") == "1"
#: Fail-closed answers while the database is down.
DOWN_CODES = {"database_unavailable", "audit_unavailable"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the embedded SQLite file) or an empty PostgreSQL database the server migrates."""
    if request.param == "sqlite":
        yield None
        return
    cluster: PgCluster | None = request.getfixturevalue("pg_cluster")
    if cluster is None:
        pytest.skip("PostgreSQL disabled (SANDBOXSEC_TEST_NO_PG=1)")
    name = f"faults_{os.getpid()}_{secrets.token_hex(4)}"
    admin = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield cluster.url(name)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _assert_clean(deployment: Deployment, base: str, ledger: Ledger) -> None:
    problems = check_ledger(deployment, base, ledger)
    assert not problems, "\n".join(problems[:30]) + "\n" + summary(ledger)


def _assert_did_work(ledger: Ledger) -> None:
    # The checks prove little if the load never reached the interesting states.
    assert ledger.sessions and ledger.records, summary(ledger)
    assert any(a.decided for a in ledger.approvals.values()), summary(ledger)
    assert any(g.used for g in ledger.grants.values()), summary(ledger)


# --- kill -9 -------------------------------------------------------------------------------


def _kill9_run(tmp_path: Path, database_url: str | None, *, seconds: float,
               kill_after: float) -> None:
    deployment = Deployment(tmp_path / "home", database_url)
    deployment.create_tenants("bank-a", "bank-b")
    server = Server(deployment, workers=2)
    server.start()
    try:
        cfg = LoadConfig(agents_per_tenant=3, approvers_per_tenant=2, seconds=seconds,
                         wait_timeout=2.0)
        ledger = Ledger()

        async def crash() -> None:
            await asyncio.sleep(kill_after)
            await asyncio.to_thread(server.kill9)

        async def both() -> None:
            await asyncio.gather(
                run_load_async(server.base, deployment.tenants, deployment.trust, cfg, ledger),
                crash())

        asyncio.run(both())
        killed_with = (len(ledger.sessions), len(ledger.records))
        # The crash was real: requests in flight or sent afterwards got no answer.
        assert any("transport:" in k for k in ledger.errors), summary(ledger)
        # Restart on the same home and database, as an operator (or systemd) would.
        server.start()
        # Life goes on after the restart: new agents attest, work and get approvals.
        asyncio.run(run_load_async(server.base, deployment.tenants, deployment.trust,
                                   LoadConfig(agents_per_tenant=1, approvers_per_tenant=1,
                                              seconds=1.5, wait_timeout=2.0), ledger))
        assert len(ledger.sessions) > killed_with[0], summary(ledger)
        _assert_did_work(ledger)
        _assert_clean(deployment, server.base, ledger)
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_kill9_during_load_loses_no_acknowledged_write(tmp_path: Path,
                                                       database_url: str | None) -> None:
    """kill -9 of every server process mid-load, restart: every acknowledged record, decision
    and grant use is there, the logs verify, no approval or grant is in an impossible state."""
    _kill9_run(tmp_path, database_url, seconds=4.0, kill_after=2.5)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill9_soak(tmp_path: Path, database_url: str | None) -> None:
    _kill9_run(tmp_path, database_url, seconds=40.0, kill_after=30.0)


# --- the database goes away ----------------------------------------------------------------


class _Outage:
    """How the database becomes unavailable, and comes back."""

    def __init__(self, name: str, stop: Callable[[], None], start: Callable[[], None]) -> None:
        self.name, self.stop, self.start = name, stop, start


class _SqliteLock:
    """SQLite's realistic outage: another process (a backup, a VACUUM, an operator's
    ``sqlite3`` shell) holds the write lock.  Readers go on (WAL); every writer waits
    ``SANDBOXSEC_DB_TIMEOUT_SECONDS`` and must then fail closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None

    def stop(self) -> None:
        self.conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def start(self) -> None:
        assert self.conn is not None
        self.conn.execute("ROLLBACK")
        self.conn.close()
        self.conn = None


@pytest.fixture(params=["sqlite", "postgres"])
def outage_setup(request: pytest.FixtureRequest,
                 tmp_path: Path) -> Iterator[tuple[Deployment, _Outage]]:
    # Past these the service must answer 503, not hang (short here to keep the test short).
    fast = {"SANDBOXSEC_DB_TIMEOUT_SECONDS": "1", "SANDBOXSEC_AUDIT_WRITE_TIMEOUT_SECONDS": "2"}
    if request.param == "sqlite":
        deployment = Deployment(tmp_path / "home", None, extra_env=fast)
        lock = _SqliteLock(deployment.home / "sandboxsec.db")
        yield deployment, _Outage("sqlite write lock", lock.stop, lock.start)
        if lock.conn is not None:
            lock.conn.close()
        return
    if os.environ.get("SANDBOXSEC_TEST_NO_PG") == "1":
        pytest.skip("PostgreSQL disabled (SANDBOXSEC_TEST_NO_PG=1)")
    # A cluster of its own: stopping the suite's shared one would break other tests.
    cluster = PgCluster()
    try:
        url = cluster.start()
        deployment = Deployment(tmp_path / "home", url, extra_env=fast)
        yield deployment, _Outage("postgres stopped", lambda: cluster.pg_ctl("stop"),
                                  lambda: cluster.pg_ctl("start"))
    finally:
        cluster.stop()


async def _prepare(api: Api, tenant: Tenant, deployment: Deployment,
                   ledger: Ledger) -> dict[str, Any]:
    """Before the outage: a spare attestation token, a session and an unused allow grant."""
    box = Sandbox(deployment.trust)
    assert await box.bind(api, tenant)
    token = await box.attest(api, tenant)
    spare = await box.attest(api, tenant)
    assert token and spare
    status, s = await api.call("POST /v1/sessions", "POST", "/v1/sessions", tenant.h("agent"),
                               {"attestation_token": token})
    assert status == 201
    sid = s["session_id"]
    ledger.sessions[sid] = tenant.id
    status, d = await api.call("POST /v1/actions", "POST", "/v1/actions", tenant.h("agent"), {
        "session_id": sid, "action": "message", "resource": "app:chat", "params": {"n": 1}})
    assert status == 200 and d["decision"] == "allow"
    ledger.decided_by_tenant[tenant.id] += 1
    return {"box": box, "spare_token": spare, "session_id": sid, "grant": d["grant"]}


def _probes(tenant: Tenant, prep: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """One request of each kind that must not succeed while the database is down."""
    sid = prep["session_id"]
    return [
        ("challenge", "POST", "/v1/attestation/challenge", {}),
        ("session", "POST", "/v1/sessions", {"attestation_token": prep["spare_token"]}),
        ("action", "POST", "/v1/actions", {"session_id": sid, "action": "message",
                                           "resource": "app:chat", "params": {"n": 2}}),
        ("grant", "POST", "/v1/grants/verify", {"grant": prep["grant"], "action": "message",
                                                "params": {"n": 1}, "resource": "app:chat"}),
        ("record", "POST", f"/v1/sessions/{sid}/trajectory",
         {"kind": "action", "data": base64.b64encode(b"during outage").decode(), "meta": {}}),
    ]


async def _wait_sees_decision(api: Api, tenant: Tenant, sid: str, n: int) -> str:
    """An agent waits on a request while an approver (maybe on the other worker) decides."""
    status, d = await api.call("POST /v1/actions", "POST", "/v1/actions", tenant.h("agent"), {
        "session_id": sid, "action": "login", "resource": f"domain:after{n}.bank.example",
        "params": {}})
    assert status == 200 and d["decision"] == "approval_required", d
    api.ledger.decided_by_tenant[tenant.id] += 1
    aid = d["approval_id"]
    waiter = asyncio.create_task(api.call("GET /v1/approvals/{id}/wait", "GET",
                                          f"/v1/approvals/{aid}/wait?timeout=15",
                                          tenant.h("agent"), timeout=45))
    await asyncio.sleep(0.3)
    status, _ = await api.call("POST /v1/approvals/{id}/approve", "POST",
                               f"/v1/approvals/{aid}/approve", tenant.h("approver"),
                               {"params_hash": d["params_hash"]})
    assert status == 200
    status, out = await waiter
    assert status == 200
    return str(out["state"])


@pytest.mark.timeout(150)
def test_database_outage_fails_closed_and_recovers_without_restart(
        outage_setup: tuple[Deployment, _Outage]) -> None:
    deployment, outage = outage_setup
    (tenant,) = deployment.create_tenants("bank-a")
    with running(deployment, workers=2) as server:
        pid = server.proc.pid if server.proc else None
        ledger = Ledger()
        down = asyncio.Event()
        cfg = LoadConfig(agents_per_tenant=3, approvers_per_tenant=2,
                         seconds=12.0 if SOAK else 6.0, wait_timeout=2.0, outage=down)
        answers: dict[str, tuple[int, str | None]] = {}

        async def scenario() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=server.base) as client:
                api = Api(client, ledger, LoadConfig())
                prep = await _prepare(api, tenant, deployment, ledger)

                async def fault() -> None:
                    await asyncio.sleep(1.5)
                    await asyncio.to_thread(outage.stop)
                    down.set()
                    # 1. While down: each kind of write fails closed with a reason code.
                    results = await asyncio.gather(*[
                        api.call(f"probe {name}", method, url, tenant.h("agent"), body)
                        for name, method, url, body in _probes(tenant, prep)])
                    for (name, *_), (status, data) in zip(_probes(tenant, prep), results,
                                                          strict=True):
                        code = data.get("error", {}).get("code") if isinstance(data, dict) \
                            else None
                        answers[name] = (status, code)
                    await asyncio.sleep(1.0 if not SOAK else 5.0)
                    down.clear()
                    await asyncio.to_thread(outage.start)

                await asyncio.gather(
                    run_load_async(server.base, deployment.tenants, deployment.trust, cfg,
                                   ledger), fault())
                # 2. Back without a restart: the same process answers again.
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    status, _ = await api.call("recovery", "POST", "/v1/attestation/challenge",
                                               tenant.h("agent"), {})
                    if status == 200:
                        break
                    await asyncio.sleep(0.2)
                assert status == 200, "the service did not recover once the database was back"
                # 3. What was refused during the outage was not used up: the spare token
                #    starts a session now, the grant verifies (once).
                status, s = await api.call("POST /v1/sessions", "POST", "/v1/sessions",
                                           tenant.h("agent"),
                                           {"attestation_token": prep["spare_token"]})
                assert status == 201, s
                ledger.sessions[s["session_id"]] = tenant.id
                status, g = await api.call("POST /v1/grants/verify", "POST",
                                           "/v1/grants/verify", tenant.h("agent"),
                                           {"grant": prep["grant"], "action": "message",
                                            "params": {"n": 1}, "resource": "app:chat"})
                assert status == 200, g
                ledger.grants[prep["grant"]] = GrantAck(tenant.id, "message", "app:chat",
                                                        {"n": 1}, used=True)
                # 4. Waiters in every worker still hear about decisions (on PostgreSQL the
                #    LISTEN connection must have come back too).
                return {"states": [await _wait_sees_decision(api, tenant, s["session_id"], n)
                                   for n in range(4)]}

        after = asyncio.run(scenario())
        assert server.proc is not None and server.proc.pid == pid and server.proc.poll() is None
        for name, (status, code) in answers.items():
            assert status == 503 and code in DOWN_CODES, (outage.name, name, status, code)
        assert ledger.violations == [], ledger.violations
        assert after["states"] == ["approved"] * 4, after
        _assert_did_work(ledger)
        _assert_clean(deployment, server.base, ledger)
