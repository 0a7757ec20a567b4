"""The auditor's API and the offline CLI, end to end, on both backends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sandboxsec.audit.events import AuditEvent
from sandboxsec.cli import main
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.audit.conftest import decision
from tests.support.cli import cli_json


def _export(client: TestClient, tenant: TenantKeys, query: str = "") -> bytes:
    r = client.get(f"/v1/audit/export{query}", headers=tenant.headers("auditor"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    return r.content


def _pem(client: TestClient, tenant: TenantKeys, tmp_path: Path) -> Path:
    r = client.get("/v1/audit/keys", headers=tenant.headers("auditor"))
    assert r.status_code == 200
    path = tmp_path / "audit.pub"
    path.write_text(r.json()["public_key_pem"])
    return path


def test_auditor_exports_and_verifies_offline(
    client: TestClient, services: Services, tenant: TenantKeys, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    services.audit.append_many([decision(tenant.id, i) for i in range(12)])
    data = _export(client, tenant)
    export = tmp_path / "export.jsonl"
    export.write_bytes(data)
    pub = _pem(client, tenant, tmp_path)
    assert main(["audit", "verify", str(export), "--public-key", str(pub),
                 "--log", tenant.id]) == 0
    summary = cli_json(capsys.readouterr().out)
    assert summary["valid"] and summary["entries"] == summary["tree_size"] >= 14
    # The export itself was audited, and so was the tenant's creation.
    events = [json.loads(ln)["event"] for ln in data.splitlines() if ln.startswith(b'{"v":')]
    assert events[0] == AuditEvent.TENANT_CREATE and events[-1] == AuditEvent.AUDIT_EXPORT
    # The same file with one entry altered: exit 1, the entry named.
    lines = data.splitlines()
    i = next(i for i, ln in enumerate(lines) if b'"seq":5,' in ln)
    lines[i] = lines[i].replace(b'"outcome":"allow"', b'"outcome":"deny"')
    export.write_bytes(b"\n".join(lines) + b"\n")
    assert main(["audit", "verify", str(export), "--public-key", str(pub)]) == 1
    captured = capsys.readouterr()
    result = cli_json(captured.out)
    assert (result["valid"], result["code"], result["seq"]) == (False, "audit_chain_broken", 5)
    assert "first bad entry: seq 5" in captured.err


def test_verify_with_a_signed_note_key_and_kept_checkpoint(
    client: TestClient, services: Services, tenant: TenantKeys, tmp_path: Path,
) -> None:
    r = client.get("/v1/audit/checkpoint", headers=tenant.headers("auditor"))
    assert r.status_code == 200
    cp = r.json()
    assert cp["note"].startswith(f"{cp['origin']}\n{cp['size']}\n{cp['root_hash']}\n\n")
    kept = tmp_path / "kept.note"
    kept.write_text(cp["note"])
    services.audit.append_many([decision(tenant.id, i) for i in range(5)])
    vkey = tmp_path / "audit.vkey"
    vkey.write_text(client.get("/v1/audit/keys", headers=tenant.headers("auditor"))
                    .json()["verifier_key"])
    export = tmp_path / "e.jsonl"
    export.write_bytes(_export(client, tenant, f"?from={cp['size']}&since={cp['size']}"))
    assert main(["audit", "verify", str(export), "--public-key", str(vkey),
                 "--previous", str(kept)]) == 0


def test_inclusion_proof_and_hash_lookup(
    client: TestClient, services: Services, tenant: TenantKeys, tmp_path: Path,
) -> None:
    services.audit.append(decision(tenant.id, 0, sensitive={"payee_iban": "DE00123"}))
    h = tenant.headers("auditor")
    proof = client.get("/v1/audit/proof?seq=1", headers=h)
    assert proof.status_code == 200
    bundle = tmp_path / "proof.json"
    bundle.write_text(proof.text)
    pub = _pem(client, tenant, tmp_path)
    assert main(["audit", "verify-proof", str(bundle), "--public-key", str(pub)]) == 0
    mac = client.post("/v1/audit/hash", json={"value": "DE00123"}, headers=h).json()["hmac"]
    assert json.loads(proof.json()["entry"])["hmac"]["payee_iban"] == mac
    size = proof.json()["tree_size"]
    c = client.get(f"/v1/audit/consistency?first={size}&second={size}", headers=h)
    assert c.status_code == 200 and c.json()["proof"] == []
    bad = client.get("/v1/audit/proof?seq=999", headers=h)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "audit_range_invalid"


def test_only_auditors_read_the_log(client: TestClient, tenant: TenantKeys) -> None:
    paths = ("/v1/audit/checkpoint", "/v1/audit/export", "/v1/audit/keys",
             "/v1/audit/proof?seq=0", "/v1/audit/consistency?first=0&second=0")
    for role in ("agent", "approver", "admin"):
        for path in paths:
            r = client.get(path, headers=tenant.headers(role))
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = client.post("/v1/audit/hash", json={"value": "x"}, headers=tenant.headers(role))
        assert r.status_code == 403
    assert client.get("/v1/audit/checkpoint").status_code == 401


def test_an_auditor_sees_only_the_own_tenants_log(
    client: TestClient, services: Services, tenant: TenantKeys, other_tenant: TenantKeys,
) -> None:
    services.audit.append(decision(tenant.id, 0, body={"marker": "only-tenant-a"}))
    data = _export(client, other_tenant)
    header = json.loads(data.splitlines()[0])
    assert header["log_id"] == other_tenant.id
    assert tenant.id.encode() not in data and b"only-tenant-a" not in data
    cp = client.get("/v1/audit/checkpoint", headers=other_tenant.headers("auditor")).json()
    assert cp["log_id"] == other_tenant.id and cp["origin"].endswith("/" + other_tenant.id)
    for seq in range(cp["size"]):
        r = client.get(f"/v1/audit/proof?seq={seq}", headers=other_tenant.headers("auditor"))
        assert json.loads(r.json()["entry"])["log"] == other_tenant.id


def test_export_fails_closed_when_the_log_cannot_record_the_read(
    client: TestClient, services: Services, tenant: TenantKeys,
) -> None:
    from tests.integration.audit.conftest import sql

    sql(services, "DROP TABLE audit_entries")
    r = client.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"


def test_cli_reports_unusable_input_with_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "none"
    key = tmp_path / "k.pem"
    key.write_text("not a key")
    assert main(["audit", "verify", str(missing), "--public-key", str(key)]) == 2
    assert main(["audit", "verify-proof", str(missing), "--public-key", str(key)]) == 2


def test_operator_cli_exports_checkpoints_and_prints_the_key(
    services: Services, tenant: TenantKeys, db_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SANDBOXSEC_DATABASE_URL", db_url)
    services.audit.append(decision(None, 0, event=AuditEvent.TENANT_DELETE))
    services.audit.close()
    pub = tmp_path / "pub.pem"
    assert main(["audit", "public-key"]) == 0
    pub.write_text(capsys.readouterr().out)
    for who in (["--tenant", tenant.name], ["--service"]):
        out = tmp_path / "e.jsonl"
        assert main(["audit", "export", *who, "-o", str(out)]) == 0
        assert main(["audit", "verify", str(out), "--public-key", str(pub)]) == 0
    capsys.readouterr()
    assert main(["audit", "checkpoint", "--service"]) == 0
    assert capsys.readouterr().out.startswith("sandboxsec.local/audit/_service\n")


def test_worker_processes_give_the_cli_the_same_verdict(
    client: TestClient, services: Services, tenant: TenantKeys, tmp_path: Path,
) -> None:
    import subprocess
    import sys

    services.audit.append_many([decision(tenant.id, i) for i in range(40)])
    data = _export(client, tenant)
    pub = _pem(client, tenant, tmp_path)
    lines = data.splitlines()
    i = next(i for i, ln in enumerate(lines) if b'"seq":30,' in ln)
    altered = list(lines)
    altered[i] = altered[i].replace(b'"outcome":"allow"', b'"outcome":"deny"')
    for name, content in (("genuine", data), ("altered", b"\n".join(altered) + b"\n")):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(content)
        runs = [
            subprocess.run([sys.executable, "-m", "sandboxsec.cli", "audit", "verify", str(path),
                            "--public-key", str(pub), "--workers", workers],
                           capture_output=True, text=True, timeout=120)
            for workers in ("1", "3")
        ]
        assert runs[0].returncode == runs[1].returncode == (0 if name == "genuine" else 1)
        assert cli_json(runs[0].stdout) == cli_json(runs[1].stdout)
    assert cli_json(runs[1].stdout)["seq"] == 30
