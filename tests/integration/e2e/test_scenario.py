"""The whole product as a user meets it: the ``sandboxsec demo`` scenario, on both backends.

One run starts ``sandboxsec serve`` on a fresh state directory, a swtpm sandbox attests, an
agent records and asks, an approver decides in the approval page (Chromium, SQLite run) or
through the API (PostgreSQL run), a downstream uses the grant, and the auditor's export
verifies offline.  The assertions below are on what each party observed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sandboxsec_client import AgentClient, ApiError, DownstreamClient

from sandboxsec.cli import main
from sandboxsec.sandbox import swtpm
from sandboxsec.sandbox.scenario import (
    EXPECTED_EVENTS,
    ScenarioOptions,
    ScenarioResult,
    run_scenario,
)
from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_session
from tests.support.pgcluster import PgCluster
from tests.support.serve import empty_database

needs_swtpm = pytest.mark.skipif(not swtpm.available(), reason="swtpm is not installed")

CHROMIUM = "/usr/bin/chromium"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def postgres_url(pg_cluster: PgCluster | None) -> Iterator[str]:
    """An empty database on the suite's cluster (the demo's server migrates it)."""
    with empty_database(pg_cluster, "demo") as url:
        yield url


def _run(tmp_path: Path, **kw: Any) -> tuple[ScenarioResult, list[str]]:
    printed: list[str] = []
    options = ScenarioOptions(workdir=tmp_path / "demo", **kw)
    return run_scenario(options, out=printed.append), printed


def _assert_scenario(result: ScenarioResult, printed: list[str], workdir: Path) -> None:
    assert result.ok, "\n".join(printed)
    f = result.facts
    # Attestation: the real vTPM's quote is affirming; its token starts exactly one session.
    assert (f["attestation_status"], f["attestation_failures"]) == ("affirming", [])
    assert f["token_replay"] == "attestation_token_reused"
    # A second agent key with the session id proves nothing: no proof, or its own key's.
    assert f["second_key_refusals"] == ["dpop_proof_missing", "dpop_key_mismatch"]
    # Both sensitive actions wait for a person, with the exact params shown.
    assert f["login_decision"] == f["payment_decision"] == "approval_required"
    assert f["login_state"] == "approved" and f["login_grant_issued"]
    assert f["payment_state"] == "denied"
    # Negative checks: a deny leaves no grant and cannot be overturned; a grant is bound to its
    # params and is single use.
    assert f["payment_grant"] is None
    assert f["late_approve"] == "approval_not_pending"
    assert f["grant_other_params"] == "grant_params_mismatch"
    assert f["grant_first_use"] is True
    assert f["grant_replay"] == "grant_already_used"
    assert f["login_state_after_use"] == "consumed"
    assert f["records_written"] == 4 and f["trajectory_read_back"] is True
    # The auditor's offline check passed, over every entry of the tenant's log.
    assert f["audit_verify_exit"] == 0
    assert f["audit_verify"]["valid"] is True
    assert f["audit_verify"]["entries"] == len(result.events)
    assert [e.seq for e in result.events] == list(range(len(result.events)))
    for event, outcome in EXPECTED_EVENTS:
        assert any(e.event == event and outcome in (None, e.outcome, e.status)
                   for e in result.events), (event, outcome)
    decided = [(e.outcome, e.reason) for e in result.events if e.event == "policy:action:decide"]
    assert decided == [("approval_required", "login-new-domain"),
                       ("approval_required", "pay-approval")]
    rejects = {e.reason for e in result.events if e.event == "grant:grant:reject"}
    assert rejects == {"grant_params_mismatch", "grant_already_used"}
    assert [e.event for e in result.events].count("grant:grant:verify") == 1
    assert result.events[-1].event == "audit:log:export"
    # Nothing started by the scenario is left running.
    assert _gone(f["server_pid"]) and _gone(f["swtpm_pid"])
    # The same export with one entry altered no longer verifies, and the entry is named.
    export = workdir / "audit-export.jsonl"
    lines = export.read_bytes().splitlines()
    i = next(i for i, ln in enumerate(lines) if b'"event":"approval:request:deny"' in ln)
    lines[i] = lines[i].replace(b'"outcome":"denied"', b'"outcome":"approved"')
    export.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["audit", "verify", str(export), "--public-key",
                 str(workdir / "audit.pub")]) == 1


@pytest.mark.swtpm
@needs_swtpm
@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_demo_scenario_sqlite_with_browser(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    result, printed = _run(tmp_path, browser=True, chromium_path=CHROMIUM)
    assert result.browser_used, "\n".join(printed)
    assert any("approval page" in s.title and "Chromium" in s.detail for s in result.steps)
    _assert_scenario(result, printed, tmp_path / "demo")
    capsys.readouterr()


@pytest.mark.swtpm
@needs_swtpm
@pytest.mark.postgres
def test_demo_scenario_postgres(tmp_path: Path, postgres_url: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    result, printed = _run(tmp_path, browser=False, postgres_url=postgres_url)
    assert not result.browser_used
    assert any("(API)" in s.title for s in result.steps)
    _assert_scenario(result, printed, tmp_path / "demo")
    capsys.readouterr()


def _children() -> set[int]:
    """Live child processes of this process (from /proc)."""
    mine = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == mine and state != "Z":
            found.add(int(entry.name))
    return found


@pytest.mark.swtpm
@needs_swtpm
def test_demo_command_fails_cleanly_when_the_service_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """A database that is not there: the real command stops at the service step, exits 1,
    and leaves no process and no temporary directory behind."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = _children()
    code = main(["demo", "--no-browser",
                 "--postgres-url", "postgresql://nobody@127.0.0.1:1/none"])
    captured = capsys.readouterr()
    assert code == 1, captured.out + captured.err
    assert "FAILED" in captured.out
    assert "result: FAILED: step" in captured.err and "service starts" in captured.err
    assert list(scratch.iterdir()) == []
    assert _children() - before == set()


def test_demo_command_usage_errors_exit_2(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--postgres-url", "mysql://x/y"]) == 2
    assert "postgresql://" in capsys.readouterr().err
    # An earlier run's files are never mixed into a fresh service's state.
    (tmp_path / "leftover").write_text("x")
    assert main(["demo", "--workdir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["leftover"]


# -- the agent-runtime client on its own (in process, both backends) ----------------------------


# The client sets a per-request read timeout on long polls (longer than the poll); starlette's
# in-process TestClient ignores it and warns.
@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument")
def test_agent_client_bounded_wait_and_refusals(client: TestClient, services: Services,
                                                tenant: TenantKeys,
                                                other_tenant: TenantKeys) -> None:
    sid = make_session(services, tenant)
    agent = AgentClient(str(client.base_url), tenant.keys["agent"], http=client)
    assert agent.record(sid, "observation", b"page loaded",
                        {"step": 1}).record_id.startswith("tr_")
    params = {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh"}
    d = agent.ask(sid, "payment", "payee:acme-gmbh", params)
    assert d.decision == "approval_required" and d.approval_id is not None
    # Waiting is bounded: at the timeout the request comes back still pending, with no grant.
    waited = agent.wait(d.approval_id, timeout=0.3, poll=0.1)
    assert (waited.state, waited.grant, waited.params) == ("pending", None, params)
    # Another tenant's agent gets 404 for this tenant's approval and session, like a missing id.
    foreign = AgentClient(str(client.base_url), other_tenant.keys["agent"], http=client)
    for call in (lambda: foreign.approval(d.approval_id or ""),
                 lambda: foreign.record(sid, "observation", b"x")):
        with pytest.raises(ApiError) as refused:
            call()
        assert (refused.value.status, refused.value.code) == (404, "not_found")
    # A forged grant is an answer (valid=False with its reason), not an exception.
    downstream = DownstreamClient(str(client.base_url), tenant.keys["agent"], http=client)
    check = downstream.verify_grant("sgr1.e30.AAAA", "payment", params)
    assert not check.valid and check.code in {"grant_malformed", "grant_signature_invalid"}
    # A key the service does not know: 401 with a reason code.
    with pytest.raises(ApiError) as unknown:
        AgentClient(str(client.base_url), "ssk_0000000000000000_" + "A" * 43,
                    http=client).approval(d.approval_id)
    assert unknown.value.status == 401
