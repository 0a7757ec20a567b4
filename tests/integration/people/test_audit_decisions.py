"""An auditor re-verifies every passkey-signed decision offline, from the export alone."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sandboxsec.cli import main
from sandboxsec.people.audit_verify import AuditDecisionInvalidError, verify_decisions
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.people.conftest import EnrolFn, owned_session, request_payment
from tests.support.cli import cli_json


def _export_and_key(client: TestClient, tenant: TenantKeys, tmp_path: Path
                    ) -> tuple[bytes, Path]:
    r = client.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert r.status_code == 200
    pub = tmp_path / "audit.pub"
    pub.write_text(client.get("/v1/audit/keys",
                              headers=tenant.headers("auditor")).json()["public_key_pem"])
    return r.content, pub


def _decided(client: TestClient, services: Services, tenant: TenantKeys,
             people: EnrolFn) -> None:
    alice = people("alice")
    sid = owned_session(services, client, tenant, alice)
    assert alice.decide(request_payment(client, tenant, sid)["approval_id"]).status_code == 200
    assert alice.decide(request_payment(client, tenant, sid, "7.00")["approval_id"],
                        "deny").status_code == 200


def test_export_with_decisions_verifies_offline(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _decided(client, services, tenant, people)
    data, pub = _export_and_key(client, tenant, tmp_path)
    export = tmp_path / "export.jsonl"
    export.write_bytes(data)
    capsys.readouterr()  # the service's own log lines so far
    assert main(["audit", "verify", str(export), "--public-key", str(pub)]) == 0
    summary = cli_json(capsys.readouterr().out)
    assert summary["passkeys_registered"] == 1 and summary["decisions_verified"] == 2
    assert summary["decisions_unanchored"] == 0
    # Editing a recorded assertion: the export no longer verifies and the entry is named.
    lines = data.splitlines()
    i = next(i for i, ln in enumerate(lines) if b'"event":"approval:request:approve"' in ln)
    seq = json.loads(lines[i])["seq"]
    entry = json.loads(lines[i])
    sig = bytearray(base64.b64decode(entry["body"]["webauthn"]["signature"]))
    sig[-1] ^= 1
    old = entry["body"]["webauthn"]["signature"].encode()
    lines[i] = lines[i].replace(old, base64.b64encode(bytes(sig)))
    export.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["audit", "verify", str(export), "--public-key", str(pub)]) == 1
    result = cli_json(capsys.readouterr().out)
    assert result["valid"] is False and result["seq"] == seq


def test_decision_check_catches_what_a_log_signer_could_forge(
        client: TestClient, services: Services, tenant: TenantKeys, people: EnrolFn,
        tmp_path: Path) -> None:
    """Someone holding the audit key could re-sign an altered log; the assertions still
    name the entry, because only the person's authenticator can sign a decision."""
    _decided(client, services, tenant, people)
    data, _ = _export_and_key(client, tenant, tmp_path)
    assert verify_decisions(data).decisions_verified == 2
    lines = data.splitlines()
    i = next(i for i, ln in enumerate(lines) if b'"event":"approval:request:approve"' in ln)
    seq = json.loads(lines[i])["seq"]
    entry = json.loads(lines[i])
    forgeries = {
        # the same assertion claimed for other params
        "params_hmac": lines[i].replace(entry["body"]["params_hmac"].encode(), b"0" * 64),
        # a denial turned into an approval of the same request is another entry kind; here
        # the preimage is edited to claim another approval id
        "approval": lines[i].replace(entry["object_ids"]["approval_id"].encode(),
                                     b"apr_" + b"f" * 32),
        # another person claimed as the signer
        "person": lines[i].replace(b'"key_id":"' + entry["actor"]["key_id"].encode(),
                                   b'"key_id":"per_' + b"e" * 32),
    }
    for what, forged in forgeries.items():
        bad = b"\n".join([*lines[:i], forged, *lines[i + 1:]])
        with pytest.raises(AuditDecisionInvalidError) as err:
            verify_decisions(bad)
        assert err.value.seq == seq, what
    # An export starting after the registration cannot anchor the decisions.
    tail = b"\n".join(ln for ln in lines if b'"people:credential:register"' not in ln)
    assert verify_decisions(tail, first_seq=1).unanchored == 2
    with pytest.raises(AuditDecisionInvalidError):
        verify_decisions(tail)
