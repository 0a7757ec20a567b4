"""Prometheus metrics of a real ``sandboxsec serve --workers 2``.

With several workers each process keeps its own counters; without multiprocess mode a scrape
answered by another worker shows other numbers, and counters jump back and forth.  Here every
worker writes to one directory and ``/metrics`` sums them: counters never go down between
scrapes, and each domain counter moves after the action it counts.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faults import (
    Api,
    Deployment,
    Ledger,
    LoadConfig,
    Sandbox,
    Server,
    Tenant,
    server_for,
)
from tests.support.sessionkeys import ProofAuth

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(base: str) -> Samples:
    r = httpx.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def _proofs() -> ProofAuth:
    # Requests in a session carry a proof by its (software) session key.
    return ProofAuth(lambda: datetime.now(UTC))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Tenant,
                                                                        Deployment]]:
    deployment = Deployment(tmp_path_factory.mktemp("metrics") / "home")
    (tenant,) = deployment.create_tenants("bank-a")
    server = server_for(deployment, workers=2)
    server.start()
    try:
        yield server, tenant, deployment
    finally:
        server.stop()


def test_counters_of_two_workers_never_go_down_between_scrapes(
        served: tuple[Server, Tenant, Deployment]) -> None:
    server, _, _ = served
    previous = 0.0
    with httpx.Client(base_url=server.base, timeout=30) as c:
        for i in range(40):
            # New connections each time, so both workers answer some of the scrapes.
            c.get("/healthz", headers={"Connection": "close"})
            samples = scrape(server.base)
            now = total(samples, "sandboxsec_http_requests_total", route="/healthz")
            assert now >= previous, f"scrape {i}: {now} after {previous}"
            assert now >= i + 1, f"scrape {i}: {now} requests counted, {i + 1} made"
            previous = now
    # Every /healthz request of this test is counted once, whichever worker served it.
    assert previous >= 40


def test_domain_counters_move_after_the_matching_action(
        served: tuple[Server, Tenant, Deployment]) -> None:
    server, tenant, deployment = served
    before = scrape(server.base)

    async def act() -> dict[str, str]:
        async with httpx.AsyncClient(base_url=server.base, auth=_proofs()) as client:
            api = Api(client, Ledger(), LoadConfig())
            box = Sandbox(deployment.trust)
            assert await box.bind(api, tenant)
            token = await box.attest(api, tenant)
            assert token
            status, s = await api.call("s", "POST", "/v1/sessions", tenant.h("agent"),
                                       {"attestation_token": token})
            assert status == 201, s
            sid = s["session_id"]
            status, d = await api.call("a", "POST", "/v1/actions", tenant.h("agent"), {
                "session_id": sid, "action": "login", "resource": "domain:m.bank.example",
                "params": {}})
            assert status == 200 and d["decision"] == "approval_required", d
            return {"sid": sid, "aid": d["approval_id"], "hash": d["params_hash"]}

    made = asyncio.run(act())
    middle = scrape(server.base)
    assert total(middle, "sandboxsec_attestation_verdicts_total", status="affirming",
                 reason="none") == total(before, "sandboxsec_attestation_verdicts_total",
                                         status="affirming", reason="none") + 1
    assert total(middle, "sandboxsec_policy_decisions_total", decision="approval_required") \
        == total(before, "sandboxsec_policy_decisions_total", decision="approval_required") + 1
    assert total(middle, "sandboxsec_audit_append_seconds_count") > \
        total(before, "sandboxsec_audit_append_seconds_count")
    assert total(middle, "sandboxsec_approvals_pending") == \
        total(before, "sandboxsec_approvals_pending") + 1
    assert total(middle, "sandboxsec_key_provider_up") == 1

    r = httpx.post(f"{server.base}/v1/approvals/{made['aid']}/approve",
                   headers=tenant.h("approver"), json={"params_hash": made["hash"]}, timeout=30)
    assert r.status_code == 200, r.text
    after = scrape(server.base)
    assert total(after, "sandboxsec_approval_decision_seconds_count", outcome="approved") == \
        total(middle, "sandboxsec_approval_decision_seconds_count", outcome="approved") + 1
    assert total(after, "sandboxsec_approvals_pending") == \
        total(middle, "sandboxsec_approvals_pending") - 1

    # A refused verdict is counted under its reason code: a quote over a wrong nonce.
    async def refused() -> None:
        async with httpx.AsyncClient(base_url=server.base, auth=_proofs()) as client:
            api = Api(client, Ledger(), LoadConfig())
            box = Sandbox(deployment.trust)
            assert await box.bind(api, tenant)
            status, ch = await api.call("c", "POST", "/v1/attestation/challenge",
                                        tenant.h("agent"), {})
            assert status == 200
            from tests.support.softtpm import marshal_quote, sign_quote

            quote = marshal_quote(b"\x00" * 32, {"sha256": deployment.trust.pcrs}, clock=99)
            status, out = await api.call("v", "POST", "/v1/attestation/verify",
                                         tenant.h("agent"), {
                "nonce": ch["nonce"], "quote": base64.b64encode(quote).decode(),
                "signature": base64.b64encode(sign_quote(box.ak, quote)).decode(),
                "ak_public": base64.b64encode(box.ak.public).decode(),
                "pcrs": {"sha256": {str(i): v.hex()
                                    for i, v in deployment.trust.pcrs.items()}},
                "event_log": base64.b64encode(deployment.trust.event_log).decode(),
                "image_manifest": deployment.trust.manifest})
            assert status == 200 and out["status"] != "affirming", out
            reasons.append(out["failures"][0]["code"])

    reasons: list[str] = []
    asyncio.run(refused())
    last = scrape(server.base)
    assert total(last, "sandboxsec_attestation_verdicts_total", reason=reasons[0]) == \
        total(after, "sandboxsec_attestation_verdicts_total", reason=reasons[0]) + 1


_STALE = """
from prometheus_client import Counter
Counter("sandboxsec_http_requests_total", "x", ["method", "route", "status"]).labels(
    "GET", "/healthz", "200").inc(1_000_000)
"""


def test_a_previous_runs_metric_files_are_not_summed_in(tmp_path: Path) -> None:
    """The multiprocess directory is emptied at start: what a previous run's workers left
    (here a counter file holding a million /healthz requests) is not added to this run's."""
    stale = tmp_path / "metrics"
    stale.mkdir()
    subprocess.run([sys.executable, "-c", _STALE], check=True, timeout=60,
                   env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(stale)})
    assert list(stale.glob("*.db"))
    deployment = Deployment(tmp_path / "home",
                            extra_env={"PROMETHEUS_MULTIPROC_DIR": str(stale)})
    server = server_for(deployment, workers=2)
    server.start()
    try:
        got = total(scrape(server.base), "sandboxsec_http_requests_total", route="/healthz")
        assert 0 < got < 1_000_000
    finally:
        server.stop()


def test_server_and_workers_write_one_json_log_stream(tmp_path: Path) -> None:
    """With the default ``SANDBOXSEC_LOG_FORMAT=json`` everything the server writes (its
    start-up line, the supervisor's and each worker's own messages, library records) is one
    stream of JSON objects: a log shipper needs no second parser."""
    import json

    deployment = Deployment(tmp_path / "home", extra_env={"SANDBOXSEC_LOG_LEVEL": "info"})
    server = server_for(deployment, workers=2)
    server.start()
    try:
        httpx.get(f"{server.base}/healthz", timeout=30)
    finally:
        server.stop()
    events = []
    for line in server.log.read_text().splitlines():
        if line.strip():
            obj = json.loads(line)  # a plain-text line fails here
            assert isinstance(obj, dict) and "event" in obj and "level" in obj, line
            events.append(obj)
    assert any(e["event"] == f"sandboxsec listening on {server.base}" and e.get("database")
               for e in events), events
    # Both workers started and stopped, and said so in the same format.
    assert sum(1 for e in events if e["event"] == "Application startup complete.") == 2
    assert any(e["event"].startswith("Finished server process") for e in events)


def test_one_worker_uses_the_operators_metrics_directory(tmp_path: Path) -> None:
    """``PROMETHEUS_MULTIPROC_DIR`` set (as the systemd unit does) with a single worker: the
    directory is made at start (it need not exist) and the counters still count."""
    chosen = tmp_path / "run" / "metrics"
    deployment = Deployment(tmp_path / "home",
                            extra_env={"PROMETHEUS_MULTIPROC_DIR": str(chosen)})
    server = server_for(deployment, workers=1)
    server.start()
    try:
        for _ in range(3):
            httpx.get(f"{server.base}/healthz", timeout=30)
        assert total(scrape(server.base), "sandboxsec_http_requests_total",
                     route="/healthz") >= 3
        assert list(chosen.glob("*.db"))
    finally:
        server.stop()
