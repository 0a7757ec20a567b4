"""A harness that drives the real service as its users do, for load and fault runs.

Used by ``tests/integration/e2e/test_faults.py`` (short runs) and ``bench/load.py`` (long
runs).  It starts ``sandboxsec serve`` in its own process group (so ``kill -9`` of the group
takes every worker down at once, as a crashed host would), simulates agents and approvers with
``httpx`` async clients on loopback, and keeps a :class:`Ledger` of every write the service
*acknowledged*.  :func:`check_ledger` then proves, through the public API and the offline
audit verifier, that nothing acknowledged was lost and nothing impossible happened.

The agents use the shared software TPM (``tests/support/softtpm.py``):
each binds its AK once (MakeCredential / ActivateCredential) and then quotes per session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import rsa

from sandboxsec.attestation.eventlog import EventLogBuilder
from sandboxsec.attestation.x509chain import TCG_EK_CERTIFICATE
from tests.support.pki import Issued, Publisher, make_ca, make_leaf, make_publisher
from tests.support.serve import CLI, Server, free_port, serving
from tests.support.sessionkeys import ProofAuth
from tests.support.softtpm import (
    SoftAk,
    make_manifest,
    marshal_quote,
    sign_quote,
    soft_activate,
    soft_session_evidence,
)

__all__ = [
    "CLI",
    "Api",
    "Deployment",
    "GrantAck",
    "Ledger",
    "LoadConfig",
    "Sandbox",
    "Server",
    "Tenant",
    "audit_export",
    "check_ledger",
    "free_port",
    "keep_checkpoint",
    "run_load",
    "running",
    "server_for",
    "summary",
]

RECORDS_PER_SESSION = 20
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


# --- the deployment: home, trust roots, tenants ------------------------------------------------


@dataclass
class Tenant:
    """A tenant created through the product's own code, with one API key per role."""

    id: str
    name: str
    keys: dict[str, str]

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@dataclass
class Trust:
    """What a real deployment gets from its image publisher and its TPM vendor."""

    publisher: Publisher
    manufacturer: Issued
    ek_key: rsa.RSAPrivateKey
    ek: Issued
    event_log: bytes
    pcrs: dict[int, bytes]
    manifest: str


def _boot_log() -> tuple[bytes, dict[int, bytes]]:
    builder = EventLogBuilder(("sha256",))
    pcrs = {i: bytes(32) for i in range(8)}
    for n in range(24):
        digest = hashlib.sha256(f"boot component {n}".encode()).digest()
        builder.add(n % 8, 0x80000001 + n % 6, f"component {n}".encode(),
                    digests={"sha256": digest})
        pcrs[n % 8] = hashlib.sha256(pcrs[n % 8] + digest).digest()
    return builder.to_bytes(), pcrs


def make_trust(home: Path) -> Trust:
    """Create a publisher and a TPM manufacturer and install their roots under ``home``."""
    now = datetime.now(UTC)
    publisher = make_publisher(not_before=now - timedelta(days=1),
                               not_after=now + timedelta(days=30))
    manufacturer = make_ca("Load TPM CA")
    ek_key = rsa.generate_private_key(65537, 2048)
    ek = make_leaf(manufacturer, "Load EK", key=ek_key, key_usage=("key_encipherment",),
                   eku=(TCG_EK_CERTIFICATE,))
    roots = home / "trust" / "trust-roots"
    (roots / "publishers").mkdir(parents=True, exist_ok=True)
    (roots / "tpm-manufacturers").mkdir(parents=True, exist_ok=True)
    (roots / "publishers" / "load.pem").write_bytes(publisher.root.pem)
    (roots / "tpm-manufacturers" / "load.pem").write_bytes(manufacturer.pem)
    log, pcrs = _boot_log()
    manifest = make_manifest(publisher, pcrs).decode()
    return Trust(publisher, manufacturer, ek_key, ek, log, pcrs, manifest)


_CREATE_TENANTS = """
import json, sys
from sandboxsec.cli._common import open_services
from sandboxsec.policy.engine import bundled_default_policy
from sandboxsec.principal import Principal, Role
services = open_services(migrate=True)
out = []
# The simulated approvers are machines (approver API keys): the default policy's person-signed
# routes are opened to them, as a tenant with machine approvers would.
policy = bundled_default_policy().replace(", owner, 1, passkey", ", anyone, 1, key")
for name in sys.argv[1:]:
    c = services.tenants.create(name)
    admin = Principal(c.tenant_id, c.keys[Role.ADMIN].key_id, Role.ADMIN)
    services.policy.replace_policy(admin, policy)
    out.append({"id": c.tenant_id, "name": c.name,
                "keys": {str(r): k.key for r, k in c.keys.items()}})
services.close()
print(json.dumps(out))
"""


@dataclass
class Deployment:
    """One service installation: a home directory, optional PostgreSQL URL, trust roots,
    tenants.  Every process (server, CLI) gets :attr:`env`."""

    home: Path
    database_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    trust: Trust = field(init=False)
    tenants: list[Tenant] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.trust = make_trust(self.home)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
        env.update({"SANDBOXSEC_HOME": str(self.home), "SANDBOXSEC_LOG_LEVEL": "warning"})
        if self.database_url:
            env["SANDBOXSEC_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def create_tenants(self, *names: str) -> list[Tenant]:
        """Create tenants with the product's code in a separate process (same env as the
        server), so this process never loads the key provider or the database."""
        out = subprocess.run([sys.executable, "-c", _CREATE_TENANTS, *names], env=self.env,
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"tenant creation failed: {out.stderr[-2000:]}")
        made = [Tenant(**t) for t in json.loads(out.stdout)]
        self.tenants.extend(made)
        return made

    def public_key(self) -> Path:
        """The audit public key as the operator hands it to auditors (CLI, out of band)."""
        path = self.home / "audit-public.pem"
        if not path.exists():
            out = subprocess.run([*CLI, "audit", "public-key"], env=self.env,
                                 capture_output=True, text=True, timeout=60, check=True)
            path.write_text(out.stdout)
        return path


def running(deployment: Deployment, **kwargs: Any) -> contextlib.AbstractContextManager[Server]:
    """``sandboxsec serve --migrate`` on ``deployment`` (its env; output in server.log)."""
    return serving(deployment.env, deployment.home / "server.log", **kwargs)


def server_for(deployment: Deployment, **kwargs: Any) -> Server:
    """A :class:`Server` of ``deployment``, not yet started."""
    return Server(deployment.env, deployment.home / "server.log", **kwargs)


# --- what the service acknowledged ---------------------------------------------------------


@dataclass
class ApprovalAck:
    tenant_id: str
    session_id: str
    action: str
    resource: str
    params: dict[str, Any]
    params_hash: str
    decided: str | None = None  # "approve" / "deny", once the service answered 200
    grant: str | None = None


@dataclass
class GrantAck:
    tenant_id: str
    action: str
    resource: str
    params: dict[str, Any]
    used: bool = False  # the service answered 200 to a verify: it must never do so again


@dataclass
class Ledger:
    """Every acknowledged write, plus latencies and error answers of the run."""

    sessions: dict[str, str] = field(default_factory=dict)  # session id -> tenant id
    #: attestation id -> (tenant id, verdict status) of every verdict the service answered.
    verdicts: dict[str, tuple[str, str]] = field(default_factory=dict)
    records: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # id -> t, s, sha
    decisions: Counter[str] = field(default_factory=Counter)
    decided_by_tenant: Counter[str] = field(default_factory=Counter)
    approvals: dict[str, ApprovalAck] = field(default_factory=dict)
    grants: dict[str, GrantAck] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    #: Things that must never happen: a success while the store was down, a double decision.
    violations: list[str] = field(default_factory=list)
    outage_answers: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    finished: float = 0.0


#: POSTs that write nothing: a challenge's nonce is stateless (minted from a key that may
#: still be readable while writes are refused), so answering one during an outage is fine.
STATELESS_POSTS = frozenset({"/v1/attestation/challenge"})


@dataclass
class LoadConfig:
    agents_per_tenant: int = 2
    approvers_per_tenant: int = 2
    seconds: float = 5.0
    max_sessions: int = 10_000
    records_per_session: int = RECORDS_PER_SESSION
    wait_timeout: float = 10.0
    #: While set, any 2xx answer to a request sent inside the window is a violation.
    outage: asyncio.Event | None = None


class Api:
    """One async client with latency and error bookkeeping."""

    def __init__(self, client: httpx.AsyncClient, ledger: Ledger, cfg: LoadConfig) -> None:
        self.c = client
        self.ledger = ledger
        self.cfg = cfg

    async def call(self, label: str, method: str, url: str, headers: Mapping[str, str],
                   body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        outage = self.cfg.outage
        down_at_send = outage is not None and outage.is_set()
        t0 = time.perf_counter()
        try:
            r = await self.c.request(method, url, headers=headers, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            self.ledger.errors[f"{label} transport:{type(exc).__name__}"] += 1
            return 0, None
        elapsed = time.perf_counter() - t0
        self.ledger.latencies.setdefault(label, []).append(elapsed)
        try:
            data = r.json()
        except ValueError:
            data = None
        down_at_answer = outage is not None and outage.is_set()
        if r.status_code >= 400:
            code = data.get("error", {}).get("code") if isinstance(data, dict) else None
            self.ledger.errors[f"{label} {r.status_code} {code}"] += 1
            if down_at_send and down_at_answer:
                self.ledger.outage_answers[f"{r.status_code} {code}"] += 1
        elif (down_at_send and down_at_answer and method == "POST"
              and url not in STATELESS_POSTS):
            # Every other POST changes state or decides something: none may succeed while
            # the store it must record that in is down.  (Reads of committed state may.)
            self.ledger.violations.append(f"{label} {r.status_code} {str(data)[:200]}")
        elif down_at_send and down_at_answer:
            self.ledger.outage_answers[f"{r.status_code} (read)"] += 1
        return r.status_code, data


class Sandbox:
    """One simulated sandbox: an AK (bound once), quoting with a monotonic TPM clock."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self.ak = SoftAk()
        self.tick = 10_000
        self.bound = False

    async def bind(self, api: Api, tenant: Tenant) -> bool:
        ak_b64 = base64.b64encode(self.ak.public).decode()
        status, ch = await api.call("POST /v1/attestation/ak/challenge", "POST",
                                    "/v1/attestation/ak/challenge", tenant.h("agent"), {
                                        "ak_public": ak_b64,
                                        "ek_certificate": base64.b64encode(
                                            self.trust.ek.der).decode()})
        if status != 200:
            return False
        secret = soft_activate(self.trust.ek_key, self.ak.name,
                               base64.b64decode(ch["credential_blob"]),
                               base64.b64decode(ch["encrypted_secret"]))
        status, _ = await api.call("POST /v1/attestation/ak/activate", "POST",
                                   "/v1/attestation/ak/activate", tenant.h("agent"), {
                                       "credential_id": ch["credential_id"],
                                       "secret": base64.b64encode(secret).decode()})
        self.bound = status == 200
        return self.bound

    def evidence(self, nonce_b64: str) -> dict[str, Any]:
        """The verify body of a quote over ``nonce_b64`` (the TPM clock moves on by one)."""
        nonce = base64.b64decode(nonce_b64)
        self.tick += 1
        quote = marshal_quote(nonce, {"sha256": self.trust.pcrs}, clock=self.tick)
        return {
            "nonce": nonce_b64, "quote": base64.b64encode(quote).decode(),
            "signature": base64.b64encode(sign_quote(self.ak, quote)).decode(),
            "ak_public": base64.b64encode(self.ak.public).decode(),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in self.trust.pcrs.items()}},
            "event_log": base64.b64encode(self.trust.event_log).decode(),
            "image_manifest": self.trust.manifest,
            **soft_session_evidence(self.ak, nonce)[0],
        }

    async def attest(self, api: Api, tenant: Tenant) -> str | None:
        status, ch = await api.call("POST /v1/attestation/challenge", "POST",
                                    "/v1/attestation/challenge", tenant.h("agent"), {})
        if status != 200:
            return None
        status, out = await api.call("POST /v1/attestation/verify", "POST",
                                     "/v1/attestation/verify", tenant.h("agent"),
                                     self.evidence(ch["nonce"]))
        if status == 200 and isinstance(out, dict) and out.get("attestation_id"):
            api.ledger.verdicts[str(out["attestation_id"])] = (tenant.id, str(out["status"]))
        if status != 200 or out.get("status") != "affirming":
            return None
        token = out.get("token")
        return token if isinstance(token, str) else None


async def _session(api: Api, tenant: Tenant, box: Sandbox, n: int, stop_at: float) -> bool:
    """attest -> session -> records -> actions -> grants.  False if the session never
    started (so the caller can back off during an outage)."""
    ledger, cfg = api.ledger, api.cfg
    token = await box.attest(api, tenant)
    if token is None:
        return False
    status, s = await api.call("POST /v1/sessions", "POST", "/v1/sessions", tenant.h("agent"),
                               {"attestation_token": token})
    if status != 201:
        return False
    sid = s["session_id"]
    ledger.sessions[sid] = tenant.id
    for i in range(cfg.records_per_session):
        data = os.urandom(64 + (i * 37) % 400)
        status, r = await api.call("POST /v1/sessions/{id}/trajectory", "POST",
                                   f"/v1/sessions/{sid}/trajectory", tenant.h("agent"), {
                                       "kind": "observation" if i % 2 else "action",
                                       "data": base64.b64encode(data).decode(),
                                       "meta": {"step": i}})
        if status == 201:
            ledger.records[r["record_id"]] = (tenant.id, sid, hashlib.sha256(data).hexdigest())
    uniq = f"{n}-{sid[-8:]}"
    actions: list[tuple[str, str, dict[str, Any]]] = [
        ("message", "app:chat", {"text": f"step {uniq}"}),                       # allow
        ("login", f"domain:s{uniq}.bank.example", {}),                           # approval
        ("payment", "payee:acme-gmbh", {"amount": "120.00", "currency": "EUR",    # approval
                                        "payee": "acme-gmbh", "ref": uniq}),
        ("payment", "payee:acme-gmbh", {"amount": "20000.00", "currency": "EUR",  # deny
                                        "payee": "acme-gmbh", "ref": uniq}),
    ]
    pending: list[str] = []
    for action, resource, params in actions:
        status, d = await api.call("POST /v1/actions", "POST", "/v1/actions", tenant.h("agent"),
                                   {"session_id": sid, "action": action, "resource": resource,
                                    "params": params})
        if status != 200:
            continue
        ledger.decisions[d["decision"]] += 1
        ledger.decided_by_tenant[tenant.id] += 1
        if d["decision"] == "allow":
            ledger.grants[d["grant"]] = GrantAck(tenant.id, action, resource, params)
            await _use_grant(api, tenant, d["grant"])
        elif d["decision"] == "approval_required":
            aid = d["approval_id"]
            ledger.approvals.setdefault(aid, ApprovalAck(tenant.id, sid, action, resource,
                                                         params, d["params_hash"]))
            pending.append(aid)
    for aid in pending:
        deadline = min(time.monotonic() + cfg.wait_timeout * 3, stop_at + cfg.wait_timeout)
        while time.monotonic() < deadline:
            status, a = await api.call("GET /v1/approvals/{id}/wait", "GET",
                                       f"/v1/approvals/{aid}/wait?timeout={cfg.wait_timeout}",
                                       tenant.h("agent"), timeout=cfg.wait_timeout + 30)
            if status == 200 and a["state"] != "pending":
                if a["state"] == "approved" and a.get("grant"):
                    ack = ledger.approvals[aid]
                    ack.grant = a["grant"]
                    ledger.grants.setdefault(a["grant"], GrantAck(
                        tenant.id, ack.action, ack.resource, ack.params))
                    await _use_grant(api, tenant, a["grant"])
                break
            if status != 200:
                await asyncio.sleep(0.2)
    return True


async def _use_grant(api: Api, tenant: Tenant, grant: str) -> None:
    g = api.ledger.grants[grant]
    status, _ = await api.call("POST /v1/grants/verify", "POST", "/v1/grants/verify",
                               tenant.h("agent"), {"grant": grant, "action": g.action,
                                                   "params": g.params, "resource": g.resource})
    if status == 200:
        g.used = True


async def _agent(base: str, ledger: Ledger, cfg: LoadConfig, tenant: Tenant, trust: Trust,
                 stop_at: float, counter: list[int]) -> None:
    # One client (one connection) per simulated agent: a real agent runtime has its own, and
    # one shared pool of hundreds of connections costs the load generator more CPU than the
    # service spends answering.
    # Requests in a session carry a proof by its (software) session key.
    async with httpx.AsyncClient(base_url=base, auth=ProofAuth(lambda: datetime.now(UTC))) \
            as client:
        api = Api(client, ledger, cfg)
        box = Sandbox(trust)
        while time.monotonic() < stop_at:
            if not box.bound and not await box.bind(api, tenant):
                await asyncio.sleep(0.2)
                continue
            if counter[0] >= cfg.max_sessions:
                return
            counter[0] += 1
            if not await _session(api, tenant, box, counter[0], stop_at):
                await asyncio.sleep(0.1)


async def _approver(base: str, ledger: Ledger, cfg: LoadConfig, tenant: Tenant,
                    done: asyncio.Event, index: int) -> None:
    """Answers pending requests until the agents are done: logins approved; payments approved
    or denied by their hash, so both outcomes occur; two approvers sometimes race."""
    async with httpx.AsyncClient(base_url=base) as client:
        await _approve_loop(Api(client, ledger, cfg), tenant, done, index)


async def _approve_loop(api: Api, tenant: Tenant, done: asyncio.Event, index: int) -> None:
    while not done.is_set():
        status, rows = await api.call("GET /v1/approvals", "GET",
                                      "/v1/approvals?state=pending&limit=50",
                                      tenant.h("approver"))
        if status != 200 or not rows:
            await asyncio.sleep(0.05)
            continue
        # Approvers walk the list from opposite ends, so they meet (and race) in the middle.
        for row in rows if index % 2 == 0 else list(reversed(rows)):
            verb = ("approve" if row["action"] == "login" or int(row["params_hash"][0], 16) % 2
                    else "deny")
            status, _ = await api.call(f"POST /v1/approvals/{{id}}/{verb}", "POST",
                                         f"/v1/approvals/{row['id']}/{verb}",
                                         tenant.h("approver"),
                                         {"params_hash": row["params_hash"]})
            if status == 200:
                ack = api.ledger.approvals.setdefault(row["id"], ApprovalAck(
                    tenant.id, row["session_id"], row["action"], row["resource"],
                    row["params"], row["params_hash"]))
                if ack.decided is not None:
                    api.ledger.violations.append(
                        f"approval {row['id']} decided twice: {ack.decided} then {verb}")
                ack.decided = verb


async def run_load_async(base: str, tenants: list[Tenant], trust: Trust, cfg: LoadConfig,
                         ledger: Ledger | None = None) -> Ledger:
    """Agents and approvers of every tenant, concurrently: agents start sessions for
    ``cfg.seconds`` (or until ``cfg.max_sessions``) and finish the one they are in; approvers
    answer until the last agent is done.  Throughput is counted over the agents' time."""
    if ledger is None:
        ledger = Ledger()
    stop_at = time.monotonic() + cfg.seconds
    counter = [0]
    done = asyncio.Event()
    approvers = [asyncio.create_task(_approver(base, ledger, cfg, t, done, i))
                 for t in tenants for i in range(cfg.approvers_per_tenant)]
    try:
        await asyncio.gather(*[_agent(base, ledger, cfg, t, trust, stop_at, counter)
                               for t in tenants for _ in range(cfg.agents_per_tenant)])
        ledger.finished = time.monotonic()
    finally:
        done.set()
        await asyncio.gather(*approvers)
    return ledger


def run_load(base: str, tenants: list[Tenant], trust: Trust, cfg: LoadConfig) -> Ledger:
    return asyncio.run(run_load_async(base, tenants, trust, cfg))


# --- checks after the run ------------------------------------------------------------------


def keep_checkpoint(deployment: Deployment, base: str, tenant: Tenant) -> Path:
    """What an auditor keeps between audits: the newest signed checkpoint of the log."""
    r = httpx.get(f"{base}/v1/audit/checkpoint", headers=tenant.h("auditor"), timeout=60)
    r.raise_for_status()
    path = Path(tempfile.mkstemp(prefix="checkpoint-", dir=deployment.home)[1])
    path.write_text(r.json()["note"])
    return path


def audit_export(deployment: Deployment, base: str, tenant: Tenant,
                 previous: tuple[Path, ...] = ()) -> tuple[Path, list[dict[str, Any]],
                                                          subprocess.CompletedProcess[str]]:
    """Export the tenant's log as its auditor, verify it offline with the CLI (against the
    checkpoints kept earlier, if any: the log must extend them), parse it."""
    r = httpx.get(f"{base}/v1/audit/export", headers=tenant.h("auditor"), timeout=120)
    r.raise_for_status()
    path = Path(tempfile.mkstemp(prefix="audit-", suffix=".jsonl", dir=deployment.home)[1])
    path.write_bytes(r.content)
    kept = [arg for p in previous for arg in ("--previous", str(p))]
    verdict = subprocess.run([*CLI, "audit", "verify", str(path), "--public-key",
                              str(deployment.public_key()), "--log", tenant.id, *kept],
                             env=deployment.env, capture_output=True, text=True, timeout=300)
    entries = [json.loads(line) for line in r.content.splitlines()
               if line.startswith(b'{"v":1,')]
    return path, entries, verdict


def check_ledger(deployment: Deployment, base: str, ledger: Ledger,
                 kept: Mapping[str, tuple[Path, ...]] | None = None) -> list[str]:
    """Every acknowledged write is there and consistent; every tenant's log verifies (and
    extends the checkpoints in ``kept``, by tenant id).

    Returns the list of problems (empty: all good).
    """
    problems: list[str] = list(ledger.violations)
    by_id = {t.id: t for t in deployment.tenants}
    with httpx.Client(base_url=base, timeout=60) as c:
        # 1. Records: each acknowledged record reads back (admin) with the same content.
        sessions: dict[str, set[str]] = {}
        for rid, (_, sid, _) in ledger.records.items():
            sessions.setdefault(sid, set()).add(rid)
        for sid, rids in sessions.items():
            tid = ledger.records[next(iter(rids))][0]
            r = c.get(f"/v1/sessions/{sid}/trajectory?limit=1000", headers=by_id[tid].h("admin"))
            if r.status_code != 200:
                problems.append(f"records of {sid}: {r.status_code} {r.text[:200]}")
                continue
            got = {x["record_id"]: hashlib.sha256(base64.b64decode(x["data"])).hexdigest()
                   for x in r.json()["records"]}
            for rid in rids:
                if got.get(rid) != ledger.records[rid][2]:
                    problems.append(f"acknowledged record {rid} of {sid} missing or altered")
        # 2. Approvals: the state agrees with every acknowledged decision and grant use.
        used_grants_by_approval = {}
        for aid, ack in ledger.approvals.items():
            if ack.grant is not None:
                used_grants_by_approval[aid] = ledger.grants[ack.grant].used
        states: dict[str, str] = {}
        for aid, ack in ledger.approvals.items():
            r = c.get(f"/v1/approvals/{aid}", headers=by_id[ack.tenant_id].h("approver"))
            if r.status_code != 200:
                problems.append(f"approval {aid}: {r.status_code} {r.text[:200]}")
                continue
            a = r.json()
            state = states[aid] = a["state"]
            if ack.decided == "approve" and state not in ("approved", "consumed"):
                problems.append(f"approval {aid} acknowledged approved, now {state}")
            if ack.decided == "deny" and state != "denied":
                problems.append(f"approval {aid} acknowledged denied, now {state}")
            if used_grants_by_approval.get(aid) and state != "consumed":
                problems.append(f"approval {aid}: its grant was used, state {state}")
            if state in ("approved", "consumed", "denied") and not a.get("decided_by"):
                problems.append(f"approval {aid} is {state} without a decider")
            if state == "pending" and a.get("decided_at"):
                problems.append(f"approval {aid} pending but decided at {a['decided_at']}")
        # 3. Grants: a grant the service once accepted is refused now; any other grant is
        #    accepted at most once more.
        for token, g in ledger.grants.items():
            body = {"grant": token, "action": g.action, "params": g.params,
                    "resource": g.resource}
            h = by_id[g.tenant_id].h("agent")
            first = c.post("/v1/grants/verify", headers=h, json=body)
            if g.used and first.status_code != 409:
                problems.append(f"used grant accepted again: {first.status_code}")
            if first.status_code == 200:
                second = c.post("/v1/grants/verify", headers=h, json=body)
                if second.status_code == 200:
                    problems.append("a grant was accepted twice after the run")
    # 4. The audit log of each tenant verifies offline and holds every acknowledged operation.
    for tenant in deployment.tenants:
        _, entries, verdict = audit_export(deployment, base, tenant,
                                           (kept or {}).get(tenant.id, ()))
        if verdict.returncode != 0:
            problems.append(f"audit verify of {tenant.id}: exit {verdict.returncode} "
                            f"{verdict.stdout[-500:]} {verdict.stderr[-500:]}")
        problems += _check_audit(tenant, entries, ledger, states)
    return problems


def _ids(entries: list[dict[str, Any]], event: str, key: str) -> Counter[str]:
    return Counter(str(e["object_ids"].get(key)) for e in entries if e["event"] == event)


def _check_audit(tenant: Tenant, entries: list[dict[str, Any]], ledger: Ledger,
                 states: dict[str, str]) -> list[str]:
    problems = []
    writes = _ids(entries, "trajectory:record:write", "record_id")
    for rid, (tid, _, _) in ledger.records.items():
        if tid == tenant.id and not writes[rid]:
            problems.append(f"record {rid} acknowledged but its write is not in the audit log")
    verdicts = _ids(entries, "attestation:quote:verdict", "attestation_id")
    for att, (tid, status) in ledger.verdicts.items():
        if tid == tenant.id and not verdicts[att]:
            problems.append(f"verdict {att} ({status}) acknowledged but not in the audit log")
    starts = _ids(entries, "session:session:start", "session_id")
    for sid, tid in ledger.sessions.items():
        if tid == tenant.id and not starts[sid]:
            problems.append(f"session {sid} acknowledged but not in the audit log")
    decided = sum(1 for e in entries if e["event"] == "policy:action:decide")
    if decided < ledger.decided_by_tenant[tenant.id]:
        problems.append(f"{tenant.id}: {decided} decisions audited, "
                        f"{ledger.decided_by_tenant[tenant.id]} acknowledged")
    approved = _ids(entries, "approval:request:approve", "approval_id")
    denied = _ids(entries, "approval:request:deny", "approval_id")
    # Every request in the log, acknowledged or not (cut off by a crash): decided at most once.
    for aid in set(approved) | set(denied):
        if approved[aid] + denied[aid] > 1:
            problems.append(f"approval {aid} decided {approved[aid] + denied[aid]} times")
    for aid, ack in ledger.approvals.items():
        if ack.tenant_id != tenant.id:
            continue
        if ack.decided == "approve" and not approved[aid]:
            problems.append(f"approval {aid} acknowledged approved, not audited")
        if ack.decided == "deny" and not denied[aid]:
            problems.append(f"approval {aid} acknowledged denied, not audited")
        if states.get(aid) == "consumed" and not approved[aid]:
            problems.append(f"approval {aid} consumed without an audited approval")
    verified_ids = _ids(entries, "grant:grant:verify", "grant_id")
    for gid, n in verified_ids.items():
        if n > 1:
            problems.append(f"grant {gid} was accepted {n} times")
    verified = sum(verified_ids.values())
    used = sum(1 for g in ledger.grants.values() if g.used and g.tenant_id == tenant.id)
    if verified < used:
        problems.append(f"{tenant.id}: {verified} grant uses audited, {used} acknowledged")
    return problems


# --- reporting -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def summary(ledger: Ledger) -> str:
    """Throughput, latency per endpoint, and error answers by status and reason code."""
    elapsed = max(1e-9, ledger.finished - ledger.started)
    actions = sum(ledger.decisions.values())
    lines = [
        f"  {len(ledger.sessions)} sessions in {elapsed:.1f} s: "
        f"{len(ledger.sessions) / elapsed:.1f} sessions/s, "
        f"{len(ledger.records) / elapsed:.0f} records/s, {actions / elapsed:.1f} actions/s "
        f"({dict(ledger.decisions)}), approvals {len(ledger.approvals)}, "
        f"grants used {sum(g.used for g in ledger.grants.values())}",
        f"  {'endpoint':45} {'count':>7} {'p50 ms':>8} {'p99 ms':>8}",
    ]
    for label in sorted(ledger.latencies):
        lat = ledger.latencies[label]
        lines.append(f"  {label:45} {len(lat):7d} {statistics.median(lat) * 1000:8.1f} "
                     f"{percentile(lat, 0.99) * 1000:8.1f}")
    if ledger.errors:
        lines.append("  error answers: " + ", ".join(
            f"{k}: {v}" for k, v in sorted(ledger.errors.items())))
    return "\n".join(lines)
