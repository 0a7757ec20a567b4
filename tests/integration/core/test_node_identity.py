"""Nodes share one identity: two nodes with separate homes on one database (SQLite and
PostgreSQL) verify each other's nonces, tokens and grants and sign one tenant's log with one
key; a node with another root key, or with key files of its own, refuses to start."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import select

from sandboxsec.api.app import create_app
from sandboxsec.audit.errors import AuditCheckpointKeyMismatchError
from sandboxsec.audit.keys import AuditKeys
from sandboxsec.audit.verify import verify_export
from sandboxsec.clock import FixedClock
from sandboxsec.crypto.errors import NodeIdentityMismatchError
from sandboxsec.crypto.models import ServiceKeyRow
from sandboxsec.crypto.service_keys import SERVICE_KEYS
from sandboxsec.jose import okp_jwk
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys, make_tenant
from tests.integration.attestation.conftest import bind, make_machine, nonce_for
from tests.integration.policy.conftest import make_session
from tests.support.sessionkeys import proof_auth_for

REPO = Path(__file__).resolve().parents[3]
MESSAGE = {"channel": "ops", "text": "deploy done"}


def _settings(home: Path) -> Settings:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Settings(home=home, public_url="http://testserver")


def _node(home: Path, db_url: str, clock: FixedClock) -> Services:
    # Tenant key files of the local provider are per tenant and live on storage every node
    # shares (docs/operations.md, "Key distribution"); only the service keys are the subject.
    settings = _settings(home).model_copy(
        update={"tenant_key_dir": home.parent / "shared-tenant-keys"})
    return Services(settings, clock=clock, db=Database(db_url))


def _own_root_key(home: Path) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "root.key").write_bytes(os.urandom(32))
    os.chmod(home / "root.key", 0o600)


def _copy_root_key(src: Path, dst: Path) -> None:
    dst.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy2(src / "root.key", dst / "root.key")
    os.chmod(dst / "root.key", 0o600)


@pytest.fixture
def node_a(tmp_path: Path, db_url: str, clock: FixedClock) -> Iterator[Services]:
    svc = _node(tmp_path / "a", db_url, clock)
    svc.service_keys.establish()
    yield svc
    svc.close()


@pytest.fixture
def node_b(tmp_path: Path, db_url: str, clock: FixedClock, node_a: Services) -> Iterator[Services]:
    """A second node: its own home, holding only a copy of node A's root key."""
    _copy_root_key(tmp_path / "a", tmp_path / "b")
    svc = _node(tmp_path / "b", db_url, clock)
    yield svc
    svc.close()


def _client(services: Services) -> TestClient:
    c = TestClient(create_app(services), raise_server_exceptions=False)
    c.auth = proof_auth_for(c, services.clock.now)
    return c


@pytest.fixture
def tenant(node_a: Services) -> TenantKeys:
    return make_tenant(node_a, "bank-a")


def test_an_attestation_started_on_one_node_finishes_on_the_other(
    node_a: Services, node_b: Services, tenant: TenantKeys,
) -> None:
    machine = make_machine()
    for node in (node_a, node_b):
        node.attestation.configure_trust(publishers=machine.publisher.trust(),
                                         ek_roots=[machine.manufacturer.cert])
    with _client(node_a) as a, _client(node_b) as b:
        bind(a, tenant, machine)
        nonce = nonce_for(a, tenant)  # challenge on A
        r = b.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                   json=machine.evidence(nonce))  # verified on B
        assert r.status_code == 200, r.text
        verdict = r.json()
        assert verdict["status"] == "affirming", verdict
        # B's token verifies on A, and both nodes publish the same key.
        claims = node_a.attestation.verify_token(verdict["token"], tenant_id=tenant.id)
        assert claims.tenant_id == tenant.id
        assert a.get("/v1/attestation/keys").json() == b.get("/v1/attestation/keys").json()
        # The nonce is single-use across nodes: A refuses what B consumed.
        again = a.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                       json=machine.evidence(nonce))
        assert again.json().get("status") != "affirming" and not again.json().get("token")


def test_a_grant_issued_on_one_node_verifies_on_the_other(
    node_a: Services, node_b: Services, tenant: TenantKeys,
) -> None:
    sid = make_session(node_a, tenant)
    with _client(node_a) as a, _client(node_b) as b:
        r = a.post("/v1/actions", headers=tenant.headers("agent"),
                   json={"session_id": sid, "action": "message", "resource": "app:slack",
                         "params": MESSAGE})
        assert r.status_code == 200 and r.json()["decision"] == "allow", r.text
        grant = r.json()["grant"]
        v = b.post("/v1/grants/verify", headers=tenant.headers("agent"),
                   json={"grant": grant, "action": "message", "params": MESSAGE})
        assert v.status_code == 200, v.text
        assert a.get("/v1/grants/jwks").json() == b.get("/v1/grants/jwks").json()


def test_both_nodes_sign_one_log_with_one_key_and_the_export_verifies(
    node_a: Services, node_b: Services, tenant: TenantKeys,
) -> None:
    node_a.audit.checkpoint_now(tenant.id)
    make_tenant(node_b, "bank-b")  # appends to the service log on B
    sid = make_session(node_b, tenant)
    with _client(node_b) as b:
        r = b.post("/v1/actions", headers=tenant.headers("agent"),
                   json={"session_id": sid, "action": "message", "resource": "app:slack",
                         "params": MESSAGE})
        assert r.status_code == 200, r.text
    node_b.audit.checkpoint_now(tenant.id)
    assert node_a.audit.keys.public_pem() == node_b.audit.keys.public_pem()
    data = b"".join(node_a.audit.export(tenant.id))
    report = verify_export(data, node_a.audit.keys.public_key, expected_log=tenant.id)
    assert report.checkpoints >= 2


def test_a_node_with_another_root_key_refuses(
    tmp_path: Path, db_url: str, clock: FixedClock, node_a: Services, tenant: TenantKeys,
) -> None:
    _own_root_key(tmp_path / "c")
    stranger = _node(tmp_path / "c", db_url, clock)
    try:
        with pytest.raises(NodeIdentityMismatchError) as err:
            stranger.service_keys.establish()
        assert err.value.code == "node_identity_mismatch"
        assert "root key" in err.value.message
        # Nothing is signed or verified with another identity, each use fails closed.
        with pytest.raises(NodeIdentityMismatchError):
            stranger.attestation.public_jwks()
        with pytest.raises(NodeIdentityMismatchError):
            stranger.audit.checkpoint_now(tenant.id)
        with _client(stranger) as c:
            health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["node_identity"] == "mismatch"
        with _client(node_a) as a:
            assert a.get("/healthz").json()["node_identity"] == "ok"
    finally:
        stranger.close()
    with node_a.db.session() as s:
        assert len(s.exec(select(ServiceKeyRow)).all()) == len(SERVICE_KEYS)


def test_a_node_keeping_its_own_key_files_refuses(
    tmp_path: Path, db_url: str, clock: FixedClock, node_a: Services,
) -> None:
    home = tmp_path / "d"
    _copy_root_key(tmp_path / "a", home)
    AuditKeys(home, "sandboxsec.local/audit").public_pem()  # an old single node's audit keys
    node = _node(home, db_url, clock)
    try:
        with pytest.raises(NodeIdentityMismatchError, match=r"signing_key\.pem"):
            node.service_keys.establish()
    finally:
        node.close()


def test_a_log_never_receives_a_checkpoint_by_another_key(
    tmp_path: Path, db_url: str, clock: FixedClock, node_a: Services, tenant: TenantKeys,
) -> None:
    node_a.audit.checkpoint_now(tenant.id)
    # A node running an earlier version: its own checkpoint key in a file.
    rogue = _node(tmp_path / "e", db_url, clock)
    rogue.__dict__["_audit_keys"] = AuditKeys(tmp_path / "e", node_a.settings.audit_origin)
    try:
        before = node_a.audit.latest_checkpoint(tenant.id)
        sid = make_session(node_a, tenant)
        with _client(node_a) as a:
            a.post("/v1/actions", headers=tenant.headers("agent"),
                   json={"session_id": sid, "action": "message", "resource": "app:slack",
                         "params": MESSAGE})
        with pytest.raises(AuditCheckpointKeyMismatchError) as err:
            rogue.audit.checkpoint_now(tenant.id)
        assert err.value.code == "audit_checkpoint_key_mismatch"
        assert node_a.audit.latest_checkpoint(tenant.id) == before
    finally:
        rogue.close()
    node_a.audit.checkpoint_now(tenant.id)
    data = b"".join(node_a.audit.export(tenant.id))
    verify_export(data, node_a.audit.keys.public_key, expected_log=tenant.id)


def test_an_upgraded_node_imports_its_key_files_and_they_keep_verifying(
    tmp_path: Path, db_url: str, clock: FixedClock,
) -> None:
    from sandboxsec.attestation.service import _load_or_create_key

    home = tmp_path / "old"
    _settings(home)
    old_audit = AuditKeys(home, "sandboxsec.local/audit")
    old_pem = old_audit.public_pem()
    old_token_key = _load_or_create_key(home / "attestation-token-key.pem")
    (home / "attestation-nonce-key").write_bytes(b"n" * 32)
    os.chmod(home / "attestation-nonce-key", 0o600)
    node = _node(home, db_url, clock)
    try:
        imported = node.service_keys.establish()
        assert sorted(imported) == sorted(s.name for s in SERVICE_KEYS)
        assert node.audit.keys.public_pem() == old_pem
        assert node.audit.keys.hmac_key("tn_x") == old_audit.hmac_key("tn_x")
        published = node.attestation.public_jwks()["keys"][0]["x"]
        assert published == okp_jwk(old_token_key.public_key(), "k")["x"]
        # A second node with only the root key gets the same, imported keys.
        _copy_root_key(home, tmp_path / "new")
        other = _node(tmp_path / "new", db_url, clock)
        try:
            assert other.service_keys.establish() == []
            assert other.audit.keys.public_pem() == old_pem
            assert other.attestation.public_jwks() == node.attestation.public_jwks()
        finally:
            other.close()
    finally:
        node.close()


_RACE = textwrap.dedent("""
    import hashlib, json, sys, time
    from pathlib import Path
    from sandboxsec.clock import SystemClock
    from sandboxsec.crypto.keys import LocalKeyProvider
    from sandboxsec.crypto.service_keys import ServiceKeys
    from sandboxsec.storage.db import Database
    home, url, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.001)
    keys = ServiceKeys(Database(url), SystemClock(), LocalKeyProvider(home), home)
    keys.establish()
    print(json.dumps({
        "public": [s.fingerprint for s in keys.status()],
        "secrets": [hashlib.sha256(keys.secret(n)).hexdigest()
                    for n in ("audit-hmac", "attestation-nonce")],
    }))
""")


def test_two_nodes_starting_at_once_on_an_empty_database_agree(
    tmp_path: Path, db_url: str,
) -> None:
    root = os.urandom(32)
    go = tmp_path / "go"
    procs = []
    for name in ("n1", "n2"):
        home = tmp_path / name
        home.mkdir(mode=0o700)
        (home / "root.key").write_bytes(root)
        os.chmod(home / "root.key", 0o600)
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _RACE, str(home), db_url, str(go)], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(1.0)  # let both interpreters reach the start line
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    db = Database(db_url)
    try:
        with db.session() as s:
            assert len(s.exec(select(ServiceKeyRow)).all()) == len(SERVICE_KEYS)
    finally:
        db.dispose()


def test_serve_refuses_to_start_with_another_root_key(
    tmp_path: Path, db_url: str, node_a: Services,
) -> None:
    home = tmp_path / "f"
    _own_root_key(home)
    env = {**os.environ, "SANDBOXSEC_HOME": str(home), "SANDBOXSEC_DATABASE_URL": db_url}
    r = subprocess.run([sys.executable, "-m", "sandboxsec.cli", "serve", "--port", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 6, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: node_identity_mismatch: ")
    assert "Traceback" not in r.stderr


def test_the_wrapped_keys_are_bound_to_their_names(node_a: Services, tmp_path: Path,
                                                   db_url: str, clock: FixedClock) -> None:
    # A database administrator swaps two wrapped secrets: the next node refuses them.
    with node_a.db.session() as s:
        rows = {r.name: r for r in s.exec(select(ServiceKeyRow)).all()}
        rows["audit-hmac"].wrapped, rows["attestation-nonce"].wrapped = (
            rows["attestation-nonce"].wrapped, rows["audit-hmac"].wrapped)
        s.add_all(rows.values())
    _copy_root_key(tmp_path / "a", tmp_path / "g")
    node = _node(tmp_path / "g", db_url, clock)
    try:
        with pytest.raises(NodeIdentityMismatchError):
            node.service_keys.establish()
    finally:
        node.close()


def test_a_swapped_public_key_is_refused(node_a: Services, tmp_path: Path, db_url: str,
                                         clock: FixedClock) -> None:
    with node_a.db.session() as s:
        row = s.get(ServiceKeyRow, ("attestation-token", 1))
        assert row is not None
        row.public_key = base64.b64decode(base64.b64encode(os.urandom(32)))
        s.add(row)
    _copy_root_key(tmp_path / "a", tmp_path / "h")
    node = _node(tmp_path / "h", db_url, clock)
    try:
        with pytest.raises(NodeIdentityMismatchError, match="public keys differ"):
            node.service_keys.establish()
    finally:
        node.close()


def test_no_service_key_is_stored_in_clear(node_a: Services, tmp_path: Path) -> None:
    secrets = [node_a.service_keys.secret(n) for n in ("audit-hmac", "attestation-nonce")]
    from cryptography.hazmat.primitives import serialization

    signers = [node_a.service_keys.signer(n) for n in ("audit-checkpoint", "attestation-token")]
    privates = [k.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
                for k in signers if hasattr(k, "private_bytes")]
    assert len(privates) == 2
    with node_a.db.session() as s:
        stored = b"".join(r.wrapped + r.public_key for r in s.exec(select(ServiceKeyRow)).all())
    files = b"".join(p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file())
    if node_a.db.is_sqlite:
        db_file = Path(node_a.db.url.split("sqlite:///", 1)[1])
        files += b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
    for material in (*secrets, *privates):
        assert material not in stored
        assert material not in files


def test_keys_migrate_imports_an_old_nodes_files_and_keys_service_lists_them(
    tmp_path: Path, db_url: str,
) -> None:
    home = tmp_path / "cli"
    _own_root_key(home)
    old_pem = AuditKeys(home, "sandboxsec.local/audit").public_pem()
    env = {**os.environ, "SANDBOXSEC_HOME": str(home), "SANDBOXSEC_DATABASE_URL": db_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandboxsec.cli", *args], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=120)

    r = cli("keys", "migrate")
    assert r.returncode == 0, r.stderr
    # The cluster keys that came from this node's files (the audit pair it had).
    assert sorted(json.loads(r.stdout)["service_keys_imported"]) == ["audit-checkpoint",
                                                                     "audit-hmac"]
    r = cli("keys", "service")
    assert r.returncode == 0, r.stderr
    listed = {k["name"]: k for k in json.loads(r.stdout)}
    assert set(listed) == {s.name for s in SERVICE_KEYS}
    assert listed["audit-checkpoint"]["origin"] == "imported"
    assert listed["attestation-token"]["origin"] == "generated"
    assert all(k["held"].startswith("wrapped by local:") for k in listed.values())
    assert "PRIVATE" not in r.stdout
    db = Database(db_url)
    node = Services(_settings(home), db=db)
    try:
        assert node.audit.keys.public_pem() == old_pem
    finally:
        node.close()
