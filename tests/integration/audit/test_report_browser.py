"""The auditor's HTML report, opened offline in headless Chromium.

A log with approvals, refusals, key rotations and a shred, cosigned by two witness processes,
is exported and turned into a report by the command line; Chromium must render the verdict,
the witnesses and every section without a single network request.  ``UPDATE_DOCS_SCREENSHOT=1``
also writes the screenshot shown in docs/audit.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord
from sandboxsec.cli import main as cli
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.settings import AuditWitness, Settings
from sandboxsec.storage.db import Database
from tests.integration.audit.witnesses import WitnessProcess, witnesses

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOG = "tn_report"
DOCS = Path(__file__).resolve().parents[3] / "docs"


def _rec(event: AuditEvent, outcome: str, key: str, role: str, **kw: object) -> AuditRecord:
    return AuditRecord(event=event, tenant_id=LOG, actor_key_id=key, actor_role=role,
                       outcome=outcome, **kw)  # type: ignore[arg-type]


def _history(svc: Services, clock: FixedClock) -> None:
    """A day of a tenant's life, one hour at a time."""
    log = svc.audit
    for hour in range(24):
        batch = [
            _rec(AuditEvent.POLICY_DECISION, "allow", "ak_agent01", "agent",
                 reason="rule_small_payments", object_ids={"session_id": f"ss_{hour}"})
            for _ in range(3 + hour % 5)
        ]
        if hour % 3 == 0:
            batch.append(_rec(AuditEvent.APPROVAL_REQUEST, "pending", "ak_agent01", "agent",
                              object_ids={"approval_id": f"ap_{hour}"}))
            who = "ak_alice" if hour % 2 else "ak_bob"
            decided = (AuditEvent.APPROVAL_APPROVE, "approved") if hour % 9 else (
                AuditEvent.APPROVAL_DENY, "denied")
            batch.append(_rec(decided[0], decided[1], who, "approver",
                              object_ids={"approval_id": f"ap_{hour}"}))
        if hour % 4 == 1:
            batch.append(_rec(AuditEvent.POLICY_DECISION, "deny", "ak_agent01", "agent",
                              reason="payee_not_allowed",
                              object_ids={"session_id": f"ss_{hour}"}))
        if hour == 7:
            batch.append(_rec(AuditEvent.GRANT_REJECT, "refused", "ak_agent01", "agent",
                              reason="grant_already_used"))
        if hour in (10, 20):
            batch.append(_rec(AuditEvent.KEY_ROTATE, "success", "ak_admin", "admin",
                              object_ids={"kek_id": f"kek_{hour}"}))
        if hour == 22:
            batch.append(_rec(AuditEvent.KEY_SHRED, "success", "", "operator",
                              object_ids={"tenant_id": LOG}))
        log.append_many(batch)
        clock.advance(3600)


@pytest.fixture
def exported(
    settings: Settings, sqlite_database: Database, clock: FixedClock, tmp_path: Path
) -> Iterator[tuple[Path, Path, list[WitnessProcess]]]:
    """An export of a witnessed log, and the audit public key, as files."""
    log_vkey = Services(settings, clock=clock, db=sqlite_database).audit.keys.verifier_key()
    with witnesses(tmp_path, log_vkey) as ws:
        s = settings.model_copy(update={
            "audit_witnesses": [AuditWitness(url=w.url, key=w.vkey) for w in ws]})
        svc = Services(s, clock=clock, db=sqlite_database)
        try:
            _history(svc, clock)
            export = tmp_path / "export.jsonl"
            export.write_bytes(b"".join(svc.audit.export(LOG)))
            pub = tmp_path / "audit.pub"
            pub.write_text(svc.audit.keys.public_pem())
        finally:
            svc.close()
        yield export, pub, ws


def _text(page: object, selector: str) -> str:
    el = page.query_selector(selector)  # type: ignore[attr-defined]
    return str(el.text_content() or "") if el is not None else ""


def _open(html: Path, screenshot: Path | None = None) -> dict[str, object]:
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            # No network at all: the context is offline and any request but the file is noted.
            context = browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(html.as_uri())
            page.wait_for_load_state("load")
            out = {
                "verdict": page.text_content("#verdict-text"),
                "code": _text(page, "#verdict-code") or None,
                "sections": page.eval_on_selector_all("section", "s => s.map(x => x.id)"),
                "bars": page.eval_on_selector_all("#timeline-chart rect", "r => r.length"),
                "witness_rows": page.eval_on_selector_all(
                    "#witnesses tbody tr", "r => r.map(x => x.textContent)"),
                "approvals": _text(page, "#approvals"),
                "keys": _text(page, "#keys"),
                "refused": _text(page, "#refused"),
                "key_ids": _text(page, "#key-ids"),
            }
            if page.query_selector("#refused") is not None:
                page.fill("#filter", "payee_not_allowed")
                out["filtered_visible"] = page.eval_on_selector_all(
                    "#refused tbody tr", "r => r.filter(x => x.style.display !== 'none').length")
                page.fill("#filter", "")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    out["requests"] = [u for u in requests if not u.startswith("file://")]
    return out


def test_the_report_loads_offline_and_shows_the_verdict(
    exported: tuple[Path, Path, list[WitnessProcess]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    export, pub, ws = exported
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"ak_alice": "Alice (treasury)", "ak_bob": "Bob (ops)"}))
    html = tmp_path / "report.html"
    args = ["audit", "report", str(export), "--public-key", str(pub), "--labels", str(labels),
            "-o", str(html)]
    for w in ws:
        args += ["--witness", w.vkey]
    assert cli([*args, "--min-witnesses", "2"]) == 0
    shot = tmp_path / "report.png"
    seen = _open(html, shot)
    assert seen["requests"] == []
    assert seen["verdict"] == "VALID"
    assert seen["sections"] == ["verdict", "witnesses", "timeline", "approvals", "refused",
                                "keys", "key-ids"]
    assert isinstance(seen["bars"], int) and seen["bars"] >= 20
    rows = seen["witness_rows"]
    assert isinstance(rows, list) and len(rows) == 2 and all("cosigned" in r for r in rows)
    assert "Alice (treasury)" in str(seen["approvals"]) and "denied" in str(seen["approvals"])
    assert "keys:kek:rotate" in str(seen["keys"]) and "keys:tenant:shred" in str(seen["keys"])
    assert "payee_not_allowed" in str(seen["refused"])
    assert "grant_already_used" in str(seen["refused"])
    assert "Bob (ops)" in str(seen["key_ids"])
    assert seen["filtered_visible"] == 6
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (DOCS / "audit-report.png").write_bytes(shot.read_bytes())


def test_a_tampered_export_gives_an_invalid_report_with_nothing_from_it(
    exported: tuple[Path, Path, list[WitnessProcess]], tmp_path: Path,
) -> None:
    export, pub, _ = exported
    lines = export.read_bytes().split(b"\n")
    i = next(k for k, ln in enumerate(lines) if b'"outcome":"denied"' in ln)
    # A hostile value too: it must come out escaped, never as markup.
    lines[i] = lines[i].replace(b'"outcome":"denied"', b'"outcome":"<script>alert(1)</script>"')
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines))
    html = tmp_path / "bad.html"
    assert cli(["audit", "report", str(bad), "--public-key", str(pub), "-o", str(html)]) == 1
    assert "<script>alert" not in html.read_text()
    seen = _open(html)
    assert seen["requests"] == []
    assert seen["verdict"] == "INVALID"
    assert seen["code"] in ("audit_root_mismatch", "audit_chain_broken")
    assert seen["sections"] == ["verdict"]
