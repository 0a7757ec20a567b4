"""With the PKCS#11 provider, attestation tokens and grants are signed inside the HSM
(SoftHSM2, ``CKM_EDDSA``): stock joserfc verifies them from the published JWK Sets, no private
key is in the database or on disk, and without the HSM nothing is issued (503)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from joserfc import jws
from joserfc.errors import BadSignatureError, SecurityWarning
from joserfc.jwk import KeySet
from sqlmodel import select

from sandboxsec.attestation.models import AttestationRecord
from sandboxsec.crypto.models import ServiceKeyRow
from sandboxsec.crypto.service_keys import HSM_OBJECT
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.policy.models import GrantRecord, GrantSigningKey
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.attestation.conftest import SoftMachine, bind, make_machine, nonce_for
from tests.integration.crypto.conftest import SoftHsm
from tests.integration.crypto.test_hsm_signing import _assert_private_key_stays_inside
from tests.integration.policy.conftest import make_session

pytestmark = pytest.mark.softhsm

MESSAGE = {"channel": "ops", "text": "deploy done"}
#: DER prefix of an Ed25519 PKCS#8 private key (RFC 8410), what a key file or dump would hold.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")


@pytest.fixture
def services(hsm_services: Services) -> Services:
    """Services whose root key is a fresh key in the SoftHSM2 token."""
    return hsm_services


@pytest.fixture
def machine(services: Services) -> SoftMachine:
    m = make_machine()
    services.attestation.configure_trust(publishers=m.publisher.trust(),
                                         ek_roots=[m.manufacturer.cert])
    return m


def _stock_verify(token: str, jwks: dict[str, object]) -> dict[str, object]:
    """Verify with joserfc as a relying party would: the JWK Set, EdDSA only.  (joserfc warns
    that RFC 9864 deprecates the name EdDSA; see sandboxsec/jose.py for why it is kept.)"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        obj = jws.deserialize_compact(token, KeySet.import_key_set(jwks),  # type: ignore[arg-type]
                                      algorithms=["EdDSA"])
    payload: dict[str, object] = json.loads(obj.payload)
    return payload


def _act(client: TestClient, tenant: TenantKeys, sid: str) -> object:
    return client.post("/v1/actions", headers=tenant.headers("agent"),
                       json={"session_id": sid, "action": "message", "resource": "app:slack",
                             "params": MESSAGE})


def test_tokens_and_grants_are_signed_in_the_hsm_and_verify_with_stock_joserfc(
    services: Services, client: TestClient, tenant: TenantKeys, machine: SoftMachine,
    softhsm: SoftHsm,
) -> None:
    # The attestation token.
    bind(client, tenant, machine)
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                    json=machine.evidence(nonce_for(client, tenant)))
    assert r.status_code == 200 and r.json()["status"] == "affirming", r.text
    claims = _stock_verify(r.json()["token"], client.get("/v1/attestation/keys").json())
    assert claims["sandboxsec.tenant"] == tenant.id
    token_signer = services.service_keys.signer("attestation-token")
    assert isinstance(token_signer, HsmEd25519Signer)
    _assert_private_key_stays_inside(softhsm, token_signer.label)
    # The grant.
    r = _act(client, tenant, make_session(services, tenant))
    assert r.status_code == 200 and r.json()["decision"] == "allow", r.text  # type: ignore[attr-defined]
    grant = r.json()["grant"]  # type: ignore[attr-defined]
    payload = _stock_verify(grant, client.get("/v1/grants/jwks").json())
    assert payload["tid"] == tenant.id and payload["act"] == "message"
    _, grant_signer = services.grants._signer.signing_key()  # type: ignore[attr-defined]
    assert isinstance(grant_signer, HsmEd25519Signer)
    _assert_private_key_stays_inside(softhsm, grant_signer.label)
    # A token whose signature was altered fails stock verification.
    head, body, sig = grant.split(".")
    forged = f"{head}.{body}.{'A' if sig[0] != 'A' else 'B'}{sig[1:]}"
    with pytest.raises(BadSignatureError):
        _stock_verify(forged, client.get("/v1/grants/jwks").json())


def test_no_private_key_material_in_the_database_or_on_disk(
    services: Services, client: TestClient, tenant: TenantKeys, machine: SoftMachine,
) -> None:
    bind(client, tenant, machine)
    client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                json=machine.evidence(nonce_for(client, tenant)))
    _act(client, tenant, make_session(services, tenant))
    services.audit.checkpoint_now(tenant.id)
    with services.db.session() as s:
        rows = s.exec(select(ServiceKeyRow)).all()
        grant_keys = s.exec(select(GrantSigningKey)).all()
    signing = [r for r in rows if r.kind == "ed25519"]
    assert {r.name for r in signing} == {"audit-checkpoint", "attestation-token"}
    assert all(r.wrapped == b"" and r.provider_id.startswith(HSM_OBJECT) for r in signing)
    # The two secrets are wrapped by the HSM's root key (format 0x02: AES-GCM in the token).
    assert all(r.wrapped[0] == 0x02 for r in rows if r.kind == "secret")
    assert grant_keys and all(k.private_key == b"" for k in grant_keys)
    # Carve the home directory and the database files for key material, as an attacker would.
    blobs = [p.read_bytes() for p in services.settings.home.rglob("*") if p.is_file()]
    if services.db.is_sqlite:
        db_file = Path(services.db.url.split("sqlite:///", 1)[1])
        blobs += [p.read_bytes() for p in db_file.parent.glob(db_file.name + "*")]
    for blob in blobs:
        assert _PKCS8_ED25519 not in blob
        assert b"PRIVATE KEY" not in blob
    assert not list(services.settings.home.rglob("*.pem"))


def test_without_the_hsm_nothing_is_issued(
    services: Services, client: TestClient, tenant: TenantKeys, machine: SoftMachine,
    softhsm: SoftHsm,
) -> None:
    bind(client, tenant, machine)
    sid = make_session(services, tenant)
    assert _act(client, tenant, sid).status_code == 200  # type: ignore[attr-defined]
    nonce = nonce_for(client, tenant)
    with services.db.session() as s:
        grants_before = len(s.exec(select(GrantRecord)).all())
        records_before = len(s.exec(select(AttestationRecord)).all())
    softhsm.remove_token()
    try:
        r = _act(client, tenant, sid)
        assert r.status_code == 503, r.text  # type: ignore[attr-defined]
        assert r.json()["error"]["code"] == "key_provider_unavailable"  # type: ignore[attr-defined]
        v = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                        json=machine.evidence(nonce))
        assert v.status_code == 503, v.text
        assert "token" not in v.json()
    finally:
        softhsm.restore_token()
    with services.db.session() as s:
        assert len(s.exec(select(GrantRecord)).all()) == grants_before
        assert len(s.exec(select(AttestationRecord)).all()) == records_before
    # The token is back: signing recovers without a restart.
    r = _act(client, tenant, sid)
    assert r.status_code == 200, r.text  # type: ignore[attr-defined]
