"""Faults under load against the real service (``sandboxsec serve --workers 2``).

Each test runs a small load of simulated agents and approvers (see ``tests/support/faults.py``),
breaks something a real deployment loses (the server process, the database, the HSM, the
network manners of a client), and then proves through the public API and the offline audit
verifier that nothing acknowledged was lost, nothing was allowed that should not have been,
and the service came back.  ``make soak`` runs the longer variants (marked ``slow``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.faults import (
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
    keep_checkpoint,
    run_load_async,
    running,
    server_for,
    summary,
)
from tests.support.pgcluster import PgCluster
from tests.support.sessionkeys import ProofAuth

#: Fail-closed answers while the database is down.
DOWN_CODES = {"database_unavailable", "audit_unavailable", "dpop_replay_store_unavailable"}


def _proofs() -> ProofAuth:
    # Requests in a session carry a proof by its (software) session key.
    return ProofAuth(lambda: datetime.now(UTC))


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
    server = server_for(deployment, workers=2)
    server.start()
    try:
        cfg = LoadConfig(agents_per_tenant=3, approvers_per_tenant=2, seconds=seconds,
                         wait_timeout=2.0)
        ledger = Ledger()

        kept: dict[str, tuple[Path, ...]] = {}

        async def crash() -> None:
            await asyncio.sleep(kill_after - 0.5)
            # An auditor's checkpoint from just before the crash: whatever the crash and the
            # restart do, the log must extend it (no rewrite, no fork).
            for t in deployment.tenants:
                kept[t.id] = (await asyncio.to_thread(keep_checkpoint, deployment,
                                                      server.base, t),)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(server.kill9)

        async def both() -> None:
            await asyncio.gather(
                run_load_async(server.base, deployment.tenants, deployment.trust, cfg, ledger),
                crash())

        asyncio.run(both())
        sessions_before = len(ledger.sessions)
        # The crash was real: requests in flight or sent afterwards got no answer.
        assert any("transport:" in k for k in ledger.errors), summary(ledger)
        # Restart on the same home and database, as an operator (or systemd) would.
        server.start()
        # Life goes on after the restart: new agents attest, work and get approvals.
        asyncio.run(run_load_async(server.base, deployment.tenants, deployment.trust,
                                   LoadConfig(agents_per_tenant=1, approvers_per_tenant=1,
                                              seconds=2.0, wait_timeout=2.0), ledger))
        assert len(ledger.sessions) > sessions_before, summary(ledger)
        _assert_did_work(ledger)
        problems = check_ledger(deployment, server.base, ledger, kept)
        assert not problems, "\n".join(problems[:30]) + "\n" + summary(ledger)
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_kill9_during_load_loses_no_acknowledged_write(tmp_path: Path,
                                                       database_url: str | None) -> None:
    """kill -9 of every server process mid-load, restart: every acknowledged record, decision
    and grant use is there, the logs verify, no approval or grant is in an impossible state."""
    _kill9_run(tmp_path, database_url, seconds=3.0, kill_after=2.0)


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
    # A verdict to submit during the outage: its nonce is stateless (issuing it wrote
    # nothing), so only the verdict is a write.
    status, ch = await api.call("POST /v1/attestation/challenge", "POST",
                                "/v1/attestation/challenge", tenant.h("agent"), {})
    assert status == 200
    return {"box": box, "spare_token": spare, "session_id": sid, "grant": d["grant"],
            "verdict": box.evidence(ch["nonce"])}


def _probes(tenant: Tenant, prep: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """One request of each kind that must not succeed while the database is down (a
    challenge writes nothing: it is refused only when the key cannot be read either)."""
    sid = prep["session_id"]
    return [
        ("challenge", "POST", "/v1/attestation/challenge", {}),
        ("verdict", "POST", "/v1/attestation/verify", prep["verdict"]),
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
    _outage_run(outage_setup, seconds=6.0, down_for=1.0)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_database_outage_soak(outage_setup: tuple[Deployment, _Outage]) -> None:
    _outage_run(outage_setup, seconds=30.0, down_for=8.0)


def _outage_run(outage_setup: tuple[Deployment, _Outage], *, seconds: float,
                down_for: float) -> None:
    """Load; the database goes away mid-load (probes of each write while it is away) and
    comes back; the same process recovers, and nothing acknowledged is lost."""
    deployment, outage = outage_setup
    (tenant,) = deployment.create_tenants("bank-a")
    with running(deployment, workers=2) as server:
        pid = server.proc.pid if server.proc else None
        ledger = Ledger()
        down = asyncio.Event()
        cfg = LoadConfig(agents_per_tenant=3, approvers_per_tenant=2,
                         seconds=seconds, wait_timeout=2.0, outage=down)
        answers: dict[str, tuple[int, str | None]] = {}
        health: dict[str, Any] = {}

        async def scenario() -> dict[str, Any]:
            async with httpx.AsyncClient(base_url=server.base, auth=_proofs()) as client:
                api = Api(client, ledger, LoadConfig())
                prep = await _prepare(api, tenant, deployment, ledger)

                async def fault() -> None:
                    await asyncio.sleep(seconds / 4)
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
                    status, data = await api.call("probe health", "GET", "/healthz", {})
                    health.update(status=status, body=data)
                    await asyncio.sleep(down_for)
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
                # 3. What was refused during the outage was not used up: the verdict's nonce
                #    still affirms once, the spare token starts a session now, the grant
                #    verifies (once).
                status, v = await api.call("POST /v1/attestation/verify", "POST",
                                           "/v1/attestation/verify", tenant.h("agent"),
                                           prep["verdict"])
                assert status == 200 and v["status"] == "affirming", v
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
            if name == "challenge" and not deployment.database_url:
                # Under an SQLite write lock the key is still read and a nonce is minted
                # without a write: a challenge is answered; the verdict (probed) is not.
                assert status == 200, (outage.name, name, status, code)
                continue
            assert status == 503 and code in DOWN_CODES, (outage.name, name, status, code)
        assert ledger.violations == [], ledger.violations
        if deployment.database_url:
            # A load balancer asking /healthz takes the instance out while PostgreSQL is away.
            # (Under an SQLite write lock reads still work, so the instance stays "up".)
            assert health["status"] == 503 and health["body"]["database"] == "unavailable", \
                health
        assert after["states"] == ["approved"] * 4, after
        _assert_did_work(ledger)
        _assert_clean(deployment, server.base, ledger)


# --- the key provider (SoftHSM2) goes away -------------------------------------------------


class _Token:
    """A SoftHSM2 token in its own directory; "unplugging" it moves the directory away, which
    is what a removed token or an unmounted token store looks like to the PKCS#11 module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.tokens.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokens}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        self.pin = secrets.token_hex(4)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "sandboxsec",
                        "--pin", self.pin, "--so-pin", secrets.token_hex(4)], check=True,
                       capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)})

    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf), "SANDBOXSEC_KEY_PROVIDER": "pkcs11",
                "SANDBOXSEC_PKCS11_MODULE": SOFTHSM_MODULE,
                "SANDBOXSEC_PKCS11_TOKEN_LABEL": "sandboxsec", "SANDBOXSEC_PKCS11_PIN": self.pin}

    def unplug(self) -> None:
        shutil.move(self.tokens, self.root / "unplugged")

    def plug(self) -> None:
        shutil.move(self.root / "unplugged", self.tokens)


@pytest.mark.softhsm
@pytest.mark.timeout(120)
def test_key_provider_outage_fails_closed_and_loses_nothing(tmp_path: Path) -> None:
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    token = _Token(tmp_path / "hsm")
    # No key cache: every record operation goes to the HSM, so the outage is seen at once
    # (with the default 60 s cache, keys already unwrapped keep working until they expire).
    deployment = Deployment(tmp_path / "home", None,
                            extra_env={**token.env(), "SANDBOXSEC_KEY_CACHE_TTL_SECONDS": "0"})
    (tenant,) = deployment.create_tenants("bank-a")
    with running(deployment, workers=2) as server:
        ledger = Ledger()

        async def scenario() -> dict[str, tuple[int, str | None]]:
            await run_load_async(server.base, deployment.tenants, deployment.trust,
                                 LoadConfig(agents_per_tenant=2, approvers_per_tenant=1,
                                            seconds=1.5, wait_timeout=2.0), ledger)
            sid, rid = next((s, r) for r, (_, s, _) in ledger.records.items())
            agent, admin = tenant.h("agent"), tenant.h("admin")
            answers: dict[str, tuple[int, str | None]] = {}
            async with httpx.AsyncClient(base_url=server.base, timeout=30, auth=_proofs()) as c:
                token.unplug()
                try:
                    record = {"kind": "action", "data": base64.b64encode(b"x" * 100).decode(),
                              "meta": {"during": "hsm outage"}}
                    for name, req in {
                        "write": c.post(f"/v1/sessions/{sid}/trajectory", headers=agent,
                                        json=record),
                        "read": c.get(f"/v1/sessions/{sid}/trajectory/{rid}", headers=admin),
                        "list": c.get(f"/v1/sessions/{sid}/trajectory", headers=admin),
                        "data": c.get(f"/v1/sessions/{sid}/trajectory/{rid}/data",
                                      headers=admin),
                    }.items():
                        r = await req
                        body = r.json() if r.headers.get("content-type", "").startswith(
                            "application/json") else {}
                        answers[name] = (r.status_code, body.get("error", {}).get("code"))
                finally:
                    token.plug()
                # Back: the same process writes and reads again.
                r = await c.post(f"/v1/sessions/{sid}/trajectory", headers=agent, json={
                    "kind": "action", "data": base64.b64encode(b"after").decode(), "meta": {}})
                assert r.status_code == 201, r.text
                ledger.records[r.json()["record_id"]] = (
                    tenant.id, sid, hashlib.sha256(b"after").hexdigest())
            return answers

        answers = asyncio.run(scenario())
        for name in ("write", "read", "list", "data"):
            assert answers[name] == (503, "key_provider_unavailable"), (name, answers)
        _assert_clean(deployment, server.base, ledger)


@pytest.mark.softhsm
@pytest.mark.timeout(60)
def test_health_reports_a_removed_hsm_at_once(tmp_path: Path) -> None:
    """A load balancer or operator asking /healthz learns the HSM is gone before any
    request fails on it (default settings, keys cached)."""
    if not Path(SOFTHSM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed")
    token = _Token(tmp_path / "hsm")
    deployment = Deployment(tmp_path / "home", None, extra_env=token.env())
    deployment.create_tenants("bank-a")
    with running(deployment, workers=1) as server:
        # Some records, so the root key exists and the tenant's keys are in use.
        ledger = asyncio.run(run_load_async(
            server.base, deployment.tenants, deployment.trust,
            LoadConfig(agents_per_tenant=1, approvers_per_tenant=1, seconds=1.0,
                       wait_timeout=1.0)))
        assert ledger.records
        assert httpx.get(f"{server.base}/healthz").json()["key_provider"] == "ok"
        token.unplug()
        try:
            r = httpx.get(f"{server.base}/healthz")
        finally:
            token.plug()
        assert (r.status_code, r.json()["key_provider"]) == (503, "unavailable"), r.text


# --- bad input and bad manners -------------------------------------------------------------


def _status(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    """Read an HTTP answer's status and the start of its body from a raw socket: 0 if the
    server closed the connection without one, -1 if it said nothing within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    try:
        # Read the head, then as much of the body as it declares (it may come in a later
        # packet than the head).
        while not _answer_complete(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        if not data:
            return -1, b""
    except ConnectionResetError:
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data[:200]
    return int(data[9:12]), data.split(b"\r\n\r\n", 1)[-1][:300]


def _answer_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= min(int(value.strip()), 300)
    return len(body) > 0


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *[f"{k}: {v}" for k, v in
                                                              headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.fixture(scope="module")
def plain_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Tenant]]:
    # A short request timeout, so the test of slow clients need not wait the default 30 s.
    deployment = Deployment(tmp_path_factory.mktemp("badinput") / "home",
                            extra_env={"SANDBOXSEC_REQUEST_TIMEOUT_SECONDS": "2"})
    (tenant,) = deployment.create_tenants("bank-a")
    with running(deployment, workers=2) as server:
        yield server, tenant


def _serves_others(server: Server, tenant: Tenant, rounds: int = 10) -> None:
    """A well-behaved client is answered, each call within a bounded time."""
    with httpx.Client(base_url=server.base, timeout=5, auth=_proofs()) as c:
        for _ in range(rounds):
            assert c.get("/healthz").status_code == 200
            r = c.post("/v1/attestation/challenge", headers=tenant.h("agent"), json={})
            assert r.status_code == 200, r.text


@pytest.mark.timeout(90)
def test_oversized_and_deep_bodies_are_refused(plain_service: tuple[Server, Tenant]) -> None:
    server, tenant = plain_service
    auth = tenant.h("agent")["Authorization"]
    # 1. A declared length over the limit: refused before a byte of the body is read.
    with _connect(server.port) as s:
        s.sendall(_head("POST", "/v1/actions", {"Authorization": auth,
                                                "Content-Type": "application/json",
                                                "Content-Length": str(100 * 1024 * 1024)}))
        status, body = _status(s)
    assert (status, b"payload_too_large" in body) == (413, True), body
    # 2. No declared length (chunked): refused once the limit is crossed, not after 100 MiB.
    with _connect(server.port) as s:
        s.sendall(_head("POST", "/v1/actions", {"Authorization": auth,
                                                "Content-Type": "application/json",
                                                "Transfer-Encoding": "chunked"}))
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        sent = 0
        try:
            s.settimeout(10)
            while sent < 100:
                s.sendall(chunk)
                sent += 1
        except OSError:
            pass  # the server answered and closed while we were still sending
        status, body = _status(s)
    assert status == 413 and b"payload_too_large" in body, (status, body)
    assert sent < 100, "the server read 100 MiB before refusing"
    # 3. Deep JSON: refused before any parser recurses into it.
    with httpx.Client(base_url=server.base, timeout=10, auth=_proofs()) as c:
        deep = "[" * 100_000 + "]" * 100_000
        r = c.post("/v1/actions", headers={**tenant.h("agent"), "Content-Type":
                                           "application/json"}, content=deep)
        assert (r.status_code, r.json()["error"]["code"]) == (400, "json_too_deep")
        # Within the body's depth limit but deeper than params may be (16): refused too.
        params: dict[str, Any] = {"q": 1}
        for _ in range(17):
            params = {"a": params}
        r = c.post("/v1/actions", headers=tenant.h("agent"), json={
            "session_id": "ses_x", "action": "message", "resource": "app:chat",
            "params": params})
        assert (r.status_code, r.json()["error"]["code"]) == (413, "params_too_large")
    _serves_others(server, tenant)


@pytest.mark.timeout(60)
def test_oversized_headers_are_refused(plain_service: tuple[Server, Tenant]) -> None:
    """Headers are bounded like bodies: 1 MiB of headers is refused (4xx) or cut off."""
    server, tenant = plain_service
    with _connect(server.port) as s:
        try:
            s.sendall(_head("GET", "/healthz", {"X-Padding": "a" * (1 << 20)}))
        except OSError:
            pass  # cut off while sending: refused
        status, _ = _status(s)
    _serves_others(server, tenant, rounds=2)
    assert status == 0 or 400 <= status < 500, status


@pytest.mark.timeout(90)
def test_slow_and_idle_clients_do_not_starve_others(plain_service: tuple[Server, Tenant]) -> None:
    server, tenant = plain_service
    auth = tenant.h("agent")["Authorization"]
    idle: list[socket.socket] = []
    try:
        # 1. Connections that never send anything.
        idle += [_connect(server.port) for _ in range(200)]
        # 2. Slowloris: a request line and part of the headers, then one header at a time.
        partial = [_connect(server.port) for _ in range(50)]
        idle += partial
        for s in partial:
            s.sendall(b"POST /v1/actions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        # 3. Slow bodies: complete headers, then the body a byte at a time.
        slow_body = [_connect(server.port) for _ in range(50)]
        idle += slow_body
        for s in slow_body:
            s.sendall(_head("POST", "/v1/actions", {"Authorization": auth,
                                                    "Content-Type": "application/json",
                                                    "Content-Length": "4096"}) + b"{")
        for n in range(3):
            for s in partial:
                s.sendall(f"X-Slow-{n}: 1\r\n".encode())
            for s in slow_body:
                s.sendall(b" ")
            # 4. Meanwhile everyone else is served, each call within the client's bound.
            _serves_others(server, tenant, rounds=5)
    finally:
        for s in idle:
            s.close()
    _serves_others(server, tenant)


@pytest.mark.timeout(60)
def test_slow_clients_are_cut_off(plain_service: tuple[Server, Tenant]) -> None:
    """A client that takes longer than the request timeout to send its headers or body is
    answered (408) or disconnected, so it cannot hold server resources forever."""
    server, tenant = plain_service
    auth = tenant.h("agent")["Authorization"]
    with _connect(server.port) as headers_slow, _connect(server.port) as body_slow:
        headers_slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        body_slow.sendall(_head("POST", "/v1/actions", {"Authorization": auth,
                                                        "Content-Length": "100"}) + b"{")
        # Generous: the request timeout is 2 s here (SANDBOXSEC_REQUEST_TIMEOUT_SECONDS).
        first = _status(headers_slow, timeout=6)
        second = _status(body_slow, timeout=2)
        for status, data in (first, second):
            assert status == 408 or (status == 0 and data == b""), (status, data)


# --- long load (make soak) -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_load_soak_loses_nothing(tmp_path: Path, database_url: str | None) -> None:
    """Minutes of agents and approvers (``bench/load.py`` in a test): nothing lost."""
    deployment = Deployment(tmp_path / "home", database_url)
    deployment.create_tenants("bank-a", "bank-b", "bank-c")
    with running(deployment, workers=2) as server:
        ledger = asyncio.run(run_load_async(
            server.base, deployment.tenants, deployment.trust,
            LoadConfig(agents_per_tenant=4, approvers_per_tenant=2, seconds=120.0,
                       wait_timeout=5.0)))
        _assert_did_work(ledger)
        assert ledger.violations == [], ledger.violations
        _assert_clean(deployment, server.base, ledger)
