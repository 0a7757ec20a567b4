"""Witnessed audit logs end to end: two witness processes, the service, the auditor's CLI.

The headline attack (SQLite and PostgreSQL): a database administrator rewrites entry 5 of a
log, recomputes every leaf hash, ``prev`` link and the head, and deletes the checkpoints that
covered it.  The service refuses to sign that history (its last signed tree is held outside
the database), raises an alarm (reason code, ``/healthz``, ``/metrics``) and stops the log; and
even a service that was made to forget its state cannot get the rewritten history cosigned, so
an auditor requiring witness cosignatures refuses it.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from sqlalchemy import text

from sandboxsec.audit.cosignature import WitnessKey, parse_witness_key
from sandboxsec.audit.errors import (
    AuditHistoryMismatchError,
    AuditLogAlarmedError,
    AuditWitnessQuorumError,
)
from sandboxsec.audit.merkle import Frontier, leaf_hash
from sandboxsec.audit.verify import verify_export
from sandboxsec.cli import main as cli
from sandboxsec.services import Services
from tests.integration.audit.conftest import CHECKPOINT_EVERY, decision, truncate_log
from tests.integration.audit.witnesses import WitnessProcess

LOG = "tn_witnessed"


def _json_out(capsys: pytest.CaptureFixture[str]) -> Any:
    """The JSON document a command printed (log lines of background threads may precede it)."""
    out = capsys.readouterr().out
    start = 0 if out.startswith(("{", "[")) else min(
        i for i in (out.find("\n{"), out.find("\n[")) if i >= 0) + 1
    return json.loads(out[start:])


def _export(svc: Services) -> bytes:
    return b"".join(svc.audit.export(LOG))


def _keys(ws: list[WitnessProcess]) -> list[Any]:
    return [parse_witness_key(w.vkey) for w in ws]


def test_checkpoints_are_cosigned_by_both_witnesses_and_published(
    witnessed: tuple[Services, list[WitnessProcess]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc, ws = witnessed
    # The operator's CLI reads the same database as the service (it never creates one).
    monkeypatch.setenv("SANDBOXSEC_DATABASE_URL", svc.db.url)
    svc.audit.append_many([decision(LOG, i) for i in range(20)])
    data = _export(svc)
    report = verify_export(data, svc.audit.keys.public_key, witnesses=_keys(ws),
                           min_witnesses=2)
    assert report.tree_size == 20
    assert sorted(c.witness for c in report.cosignatures) == [w.name for w in ws]
    # Published in the export (a field beside the unchanged note) and in the API.
    records = [json.loads(line) for line in data.split(b"\n") if line.startswith(b'{"type"')]
    newest = [r for r in records if r["type"] == "checkpoint"][-1]
    assert newest["note"].startswith(f"{svc.audit.origin(LOG)}\n20\n")
    assert len(newest["cosignatures"]) == 2
    from sandboxsec.api.app import create_app
    from tests.conftest import make_tenant

    with TestClient(create_app(svc)) as client:
        tenant = make_tenant(svc, "witnessed")
        r = client.get("/v1/audit/checkpoint", headers=tenant.headers("auditor"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["cosignatures"]) == 2
        assert body["cosigned_note"] == body["note"] + "".join(body["cosignatures"])
        assert client.get("/healthz").json()["audit"] == "ok"
    # The witnesses' own state: 0600, holding the log-signed checkpoint.
    for w in ws:
        state = w.home / "witness_state.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert f"{svc.audit.origin(LOG)}" in state.read_text()
    # The service's state file: 0600, outside the database.
    state = svc.settings.home / "audit" / "state" / f"{LOG}.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    # The auditor's command line: K of the given witnesses.
    path = tmp_path / "export.jsonl"
    path.write_bytes(data)
    pub = tmp_path / "audit.pub"
    pub.write_text(svc.audit.keys.public_pem())
    args = ["audit", "verify", str(path), "--public-key", str(pub)]
    for w in ws:
        args += ["--witness", w.vkey]
    capsys.readouterr()
    assert cli([*args, "--min-witnesses", "2"]) == 0
    out = _json_out(capsys)
    assert out["valid"] and len(out["witnesses"]) == 2
    # A witness the auditor trusts but that did not cosign: no quorum of 3.
    other = WitnessKey.from_private("other.example/w", Ed25519PrivateKey.generate()).vkey()
    assert cli([*args, "--witness", other, "--min-witnesses", "3"]) == 1
    assert _json_out(capsys)["code"] == "audit_witness_quorum_not_met"


def _rewrite_entry(svc: Services, log_id: str, seq: int) -> None:
    """What the database administrator does: edit one entry, recompute the leaf hashes and
    the ``prev`` links of it and every later entry, the head, and delete the checkpoints (and
    their cosignatures) that covered it."""
    with svc.db.engine.begin() as conn:
        rows = conn.execute(text(
            "SELECT seq, entry FROM audit_entries WHERE tenant_id = :t ORDER BY seq"
        ), {"t": log_id}).all()
        lines = [r[1].encode() for r in rows]
        assert b'"outcome":"allow"' in lines[seq]
        lines[seq] = lines[seq].replace(b'"outcome":"allow"', b'"outcome":"deny"')
        leaves = [leaf_hash(line) for line in lines]
        for i in range(seq + 1, len(lines)):
            old_prev = lines[i].split(b'"prev":"', 1)[1][:64]
            lines[i] = lines[i].replace(old_prev, leaves[i - 1].hex().encode(), 1)
            leaves[i] = leaf_hash(lines[i])
        for i in range(seq, len(lines)):
            conn.execute(text(
                "UPDATE audit_entries SET entry = :e, leaf_hash = :h "
                "WHERE tenant_id = :t AND seq = :s"
            ), {"e": lines[i].decode(), "h": leaves[i], "t": log_id, "s": i})
        frontier = Frontier()
        frontier.extend(leaves)
        conn.execute(text(
            "UPDATE audit_heads SET frontier = :f, last_leaf = :l, checkpoint_size = 0 "
            "WHERE id = :t"
        ), {"f": frontier.to_bytes(), "l": leaves[-1], "t": log_id})
        conn.execute(text("DELETE FROM audit_checkpoints WHERE tenant_id = :t AND size > :s"),
                     {"t": log_id, "s": seq})
        conn.execute(text("DELETE FROM audit_cosignatures WHERE tenant_id = :t AND size > :s"),
                     {"t": log_id, "s": seq})
    # The rewrite is self-consistent: the hash chain holds everywhere.
    assert hashlib.sha256(b"\x00" + lines[-1]).digest() == leaves[-1]


def test_a_dba_rewrite_is_refused_by_the_service_and_by_witnessing_auditors(
    witnessed: tuple[Services, list[WitnessProcess]], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc, ws = witnessed
    # The operator's CLI reads the same database as the service (it never creates one).
    monkeypatch.setenv("SANDBOXSEC_DATABASE_URL", svc.db.url)
    svc.audit.append_many([decision(LOG, i) for i in range(20)])
    genuine = _export(svc)  # checkpoint 20, cosigned by both witnesses
    verify_export(genuine, svc.audit.keys.public_key, witnesses=_keys(ws), min_witnesses=2)

    _rewrite_entry(svc, LOG, 5)

    # 1. The service refuses to sign the altered past, and stops the log.
    with pytest.raises(AuditHistoryMismatchError):
        svc.audit.checkpoint_now(LOG)
    with pytest.raises(AuditLogAlarmedError):
        svc.audit.append(decision(LOG, 99))
    # Other logs keep working.
    assert svc.audit.append(decision("tn_other", 0)).seq == 0
    from sandboxsec.api.app import create_app

    with TestClient(create_app(svc)) as client:
        h = client.get("/healthz")
        assert h.status_code == 503
        assert h.json()["audit"] == "alarm"
        assert h.json()["audit_alarms"] == ["audit_history_mismatch"]
        assert LOG not in h.text  # no tenant ids to unauthenticated callers
        m = client.get("/metrics").text
        assert 'sandboxsec_audit_alarms{code="audit_history_mismatch"} 1.0' in m
    capsys.readouterr()
    assert cli(["audit", "alarm"]) == 0
    listed = _json_out(capsys)
    assert [(a["log_id"], a["code"]) for a in listed] == [(LOG, "audit_history_mismatch")]
    # The alarm is evidence too: recorded in the service's own log.

    deadline = time.monotonic() + 20
    alarm_event = "audit:log:alarm"
    while time.monotonic() < deadline and not svc.audit.entries("_service", event=alarm_event):
        time.sleep(0.05)
    [recorded] = svc.audit.entries("_service", event="audit:log:alarm")
    assert recorded["reason"] == "audit_history_mismatch"
    assert recorded["object_ids"] == {"log_id": LOG}

    # 2. Independently: an insider who also resets the service's state file (or a service that
    #    never had one) gets the rewritten history signed, and a plain verification passes ...
    svc.audit.guard.states.clear_alarm(LOG)
    svc.audit.guard.states.forget(LOG)
    svc.audit.append_many([decision(LOG, 100 + i) for i in range(3)])
    # ... but no witness cosigns it: each holds the genuine tree of size 20, and the proof
    # from it does not verify (422).  The checkpoint signed with these appends reaches them
    # in the background, and the service raises the witness alarm ...
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and svc.audit.guard.states.alarm(LOG) is None:
        time.sleep(0.05)
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_witness_refused"
    # ... the insider removes that marker too and exports: the export verifies on its own,
    # and its checkpoint, submitted again before the export is served, is refused again ...
    svc.audit.guard.states.clear_alarm(LOG)
    forged = _export(svc)
    report = verify_export(forged, svc.audit.keys.public_key)
    assert report.tree_size == 23
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_witness_refused"
    # ... and an auditor requiring witnesses refuses the export.
    with pytest.raises(AuditWitnessQuorumError):
        verify_export(forged, svc.audit.keys.public_key, witnesses=_keys(ws), min_witnesses=1)
    path = tmp_path / "forged.jsonl"
    path.write_bytes(forged)
    pub = tmp_path / "audit.pub"
    pub.write_text(svc.audit.keys.public_pem())
    capsys.readouterr()
    assert cli(["audit", "verify", str(path), "--public-key", str(pub),
                "--witness", ws[0].vkey, "--witness", ws[1].vkey, "--min-witnesses", "1"]) == 1
    assert _json_out(capsys)["code"] == "audit_witness_quorum_not_met"
    # The witnesses still hold the genuine tree.
    for w in ws:
        held = json.loads((w.home / "witness_state.json").read_text())
        assert held["logs"][svc.audit.origin(LOG)]["size"] == 20


def test_a_truncated_log_is_refused(witnessed: tuple[Services, list[WitnessProcess]]) -> None:
    svc, _ = witnessed
    svc.audit.append_many([decision(LOG, i) for i in range(12)])
    svc.audit.checkpoint_now(LOG)
    truncate_log(svc, LOG, 10)  # back to a size that was never signed
    with pytest.raises(AuditHistoryMismatchError):
        svc.audit.append_many([decision(LOG, 50 + i) for i in range(CHECKPOINT_EVERY)])
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_history_mismatch"
    assert svc.audit.size(LOG) == 10  # nothing of the refused write was stored
    # With the service's state reset too, the witnesses still hold size 12: the service signs
    # size 10, they answer with their larger size, and the rollback raises the alarm.
    svc.audit.guard.states.clear_alarm(LOG)
    svc.audit.guard.states.forget(LOG)
    assert svc.audit.checkpoint_now(LOG).size == 10
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_witness_refused"
    assert "rolled back" in alarm.message


def test_a_tampered_state_file_stops_the_log(
    witnessed: tuple[Services, list[WitnessProcess]],
) -> None:
    svc, _ = witnessed
    svc.audit.append_many([decision(LOG, i) for i in range(3)])
    svc.audit.checkpoint_now(LOG)
    state = svc.settings.home / "audit" / "state" / f"{LOG}.json"
    doc = json.loads(state.read_text())
    doc["size"] = 2  # roll back what the service believes it signed, without the MAC key
    state.write_text(json.dumps(doc))
    svc.audit.append(decision(LOG, 3))
    from sandboxsec.audit.errors import AuditStateInvalidError

    with pytest.raises(AuditStateInvalidError):
        svc.audit.checkpoint_now(LOG)
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_state_invalid"


def test_unchanged_checkpoints_are_resubmitted_so_cosignatures_stay_fresh(
    witnessed: tuple[Services, list[WitnessProcess]],
) -> None:

    from sandboxsec.audit.cosignature import parse_cosignature_line

    svc, _ = witnessed
    svc.audit.append_many([decision(LOG, i) for i in range(3)])
    cp = svc.audit.checkpoint_now(LOG)
    first = {parse_cosignature_line(line)[0]: parse_cosignature_line(line)[2]
             for line in svc.audit.cosignatures(LOG, cp.size)[cp.size]}
    assert len(first) == 2
    time.sleep(1.1)  # cosignature timestamps have one-second resolution
    publisher = svc.audit.guard.publisher
    assert publisher is not None and publisher.refresh(every=0) == 1
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = {parse_cosignature_line(line)[0]: parse_cosignature_line(line)[2]
               for line in svc.audit.cosignatures(LOG, cp.size)[cp.size]}
        if all(now[w] > first[w] for w in first):
            break
        time.sleep(0.05)
    assert all(now[w] > first[w] for w in first)
    assert svc.audit.latest_checkpoint(LOG) == cp  # the same tree, freshly cosigned
