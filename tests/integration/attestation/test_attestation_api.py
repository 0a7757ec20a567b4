"""The attestation and session API end to end, with a software TPM (both databases)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi.testclient import TestClient

from sandboxsec.attestation import token as tokens
from sandboxsec.attestation.trust import Revocations
from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.attestation.conftest import (
    SoftMachine,
    Submit,
    b64,
    bind,
    make_machine,
    nonce_for,
)
from tests.support.pki import make_ca, make_leaf
from tests.support.softtpm import SoftAk, make_manifest

pytestmark = pytest.mark.usefixtures("machine")


def codes(verdict: dict[str, Any]) -> list[str]:
    return [f["code"] for f in verdict["failures"]]


def error(r: Any) -> str:
    code: str = r.json()["error"]["code"]
    return code


def test_affirming_verdict_token_and_session(
    client: TestClient, tenant: TenantKeys, bound: SoftMachine, submit: Submit,
    services: Services,
) -> None:
    verdict = submit()
    assert verdict["status"] == "affirming", verdict
    assert verdict["ak_name"] == bound.ak.name.hex()
    # The token verifies offline with the published JWK alone.
    jwks = client.get("/v1/attestation/keys").json()["keys"]
    x = base64.urlsafe_b64decode(jwks[0]["x"] + "==")
    claims = tokens.verify_token(
        verdict["token"], {jwks[0]["kid"]: Ed25519PublicKey.from_public_bytes(x)},
        services.clock.now(), tenant_id=tenant.id,
    )
    assert claims.status == "affirming" and claims.ak_name == bound.ak.name.hex()
    # A session starts on it, and records image and AK.
    h = tenant.headers("agent")
    r = client.post("/v1/sessions", headers=h, json={"attestation_token": verdict["token"]})
    assert r.status_code == 201, r.text
    session = r.json()
    assert session["ak_name"] == bound.ak.name.hex()
    assert session["image_digest"] == claims.image_digest
    got = client.get(f"/v1/sessions/{session['session_id']}", headers=tenant.headers("admin"))
    assert got.status_code == 200 and got.json()["attestation_id"] == verdict["attestation_id"]
    # One token, one session.
    again = client.post("/v1/sessions", headers=h, json={"attestation_token": verdict["token"]})
    assert again.status_code == 409 and error(again) == "attestation_token_reused"


def test_replayed_nonce(bound: SoftMachine, submit: Submit, client: TestClient,
                        tenant: TenantKeys) -> None:
    nonce = nonce_for(client, tenant)
    assert submit(nonce)["status"] == "affirming"
    replay = submit(nonce, clock=2000)
    assert replay["status"] == "contraindicated" and replay["token"] is None
    assert codes(replay) == ["attestation_nonce_replayed"]


def test_expired_nonce(bound: SoftMachine, submit: Submit, client: TestClient,
                       tenant: TenantKeys, services: Services, clock: FixedClock) -> None:
    nonce = nonce_for(client, tenant)
    clock.advance(services.settings.nonce_ttl_seconds + 1)
    assert codes(submit(nonce)) == ["attestation_nonce_expired"]


def test_other_tenants_nonce(bound: SoftMachine, submit: Submit, client: TestClient,
                             other_tenant: TenantKeys) -> None:
    nonce = nonce_for(client, other_tenant)
    assert codes(submit(nonce)) == ["attestation_nonce_unknown"]


def test_unbound_ak(submit: Submit, machine: SoftMachine) -> None:
    assert codes(submit()) == ["ak_not_bound"]


def test_ak_bound_by_other_tenant_is_not_bound_here(
    client: TestClient, other_tenant: TenantKeys, machine: SoftMachine, submit: Submit
) -> None:
    bind(client, other_tenant, machine)
    assert codes(submit()) == ["ak_not_bound"]


def test_ek_from_untrusted_ca(client: TestClient, tenant: TenantKeys,
                              machine: SoftMachine) -> None:
    rogue = make_ca("Rogue TPM CA")
    ek = make_leaf(rogue, "Rogue EK", key_type="rsa2048", key_usage=("key_encipherment",))
    r = client.post("/v1/attestation/ak/challenge", headers=tenant.headers("agent"),
                    json={"ak_public": b64(SoftAk().public), "ek_certificate": b64(ek.der)})
    assert r.status_code == 422 and error(r) == "cert_untrusted_issuer"


def test_wrong_activation_secret_burns_the_challenge(
    client: TestClient, tenant: TenantKeys, other_tenant: TenantKeys, machine: SoftMachine
) -> None:
    h = tenant.headers("agent")
    ch = client.post("/v1/attestation/ak/challenge", headers=h,
                     json={"ak_public": b64(machine.ak.public),
                           "ek_certificate": b64(machine.ek_der)}).json()
    body = {"credential_id": ch["credential_id"], "secret": b64(b"x" * 32)}
    foreign = client.post("/v1/attestation/ak/activate", headers=other_tenant.headers("agent"),
                          json=body)
    assert foreign.status_code == 404
    r = client.post("/v1/attestation/ak/activate", headers=h, json=body)
    assert r.status_code == 422 and error(r) == "ak_activation_failed"
    r = client.post("/v1/attestation/ak/activate", headers=h, json=body)
    assert r.status_code == 409 and error(r) == "ak_credential_used"


def test_revoked_publisher(bound: SoftMachine, submit: Submit, services: Services) -> None:
    revoked = Revocations(fingerprints=frozenset({bound.publisher.leaf.fingerprint}))
    services.attestation.configure_trust(publishers=bound.publisher.trust(revoked))
    assert codes(submit()) == ["cert_revoked"]


def test_expired_manifest(bound: SoftMachine, submit: Submit, clock: FixedClock) -> None:
    from datetime import timedelta

    stale = make_manifest(bound.publisher, bound.pcrs,
                          expires_at=clock.now() - timedelta(seconds=1))
    assert codes(submit(image_manifest=stale.decode())) == ["image_manifest_expired"]


def test_flipped_manifest_bit(bound: SoftMachine, submit: Submit) -> None:
    import json

    env = json.loads(bound.manifest)
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[8] ^= 1
    env["signatures"][0]["sig"] = b64(bytes(sig))
    assert codes(submit(image_manifest=env)) == ["image_signature_invalid"]


def test_reset_count_rollback(bound: SoftMachine, submit: Submit) -> None:
    assert submit(reset=5)["status"] == "affirming"
    assert codes(submit(reset=4, clock=999_999)) == ["quote_clock_rollback"]
    assert submit(reset=5, clock=5000)["status"] == "affirming"


def test_event_log_that_does_not_replay(bound: SoftMachine, submit: Submit) -> None:
    from tests.support.softtpm import boot_log

    assert codes(submit(event_log=b64(boot_log(25)[0]))) == ["eventlog_replay_mismatch"]


def test_malformed_evidence_is_400(bound: SoftMachine, submit: Submit) -> None:
    out = submit(quote="not base64!", status=400)
    assert out["error"]["code"] == "attestation_evidence_malformed"


def test_session_refusals(client: TestClient, tenant: TenantKeys, other_tenant: TenantKeys,
                          bound: SoftMachine, submit: Submit, clock: FixedClock,
                          services: Services) -> None:
    h = tenant.headers("agent")
    r = client.post("/v1/sessions", headers=h, json={"attestation_token": "x.y.z"})
    assert r.status_code == 422 and error(r) == "attestation_token_invalid"
    token = submit()["token"]
    r = client.post("/v1/sessions", headers=other_tenant.headers("agent"),
                    json={"attestation_token": token})
    assert r.status_code == 422 and error(r) == "attestation_token_tenant_mismatch"
    clock.advance(services.settings.attestation_token_ttl_seconds)
    r = client.post("/v1/sessions", headers=h, json={"attestation_token": token})
    assert r.status_code == 422 and error(r) == "attestation_token_expired"


def test_sessions_of_other_tenants_are_not_found(
    client: TestClient, tenant: TenantKeys, other_tenant: TenantKeys, bound: SoftMachine,
    submit: Submit,
) -> None:
    token = submit()["token"]
    sid = client.post("/v1/sessions", headers=tenant.headers("agent"),
                      json={"attestation_token": token}).json()["session_id"]
    r = client.get(f"/v1/sessions/{sid}", headers=other_tenant.headers("admin"))
    assert r.status_code == 404
    assert client.get("/v1/sessions/ses_nope", headers=tenant.headers("admin")).status_code == 404


def test_audit_failure_means_no_token(
    bound: SoftMachine, client: TestClient, tenant: TenantKeys, services: Services,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nonce = nonce_for(client, tenant)

    def broken(*_a: object, **_k: object) -> None:
        raise AuditUnavailableError("audit store is down")

    monkeypatch.setattr(services.audit_writer, "append", broken)
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                    json=bound.evidence(nonce))
    assert r.status_code == 503 and "token" not in r.json()
    # A challenge is stateless and writes nothing (the verdict records its nonce), so it is
    # answered; the verdict made with it still fails closed.
    r = client.post("/v1/attestation/challenge", headers=tenant.headers("agent"), json={})
    assert r.status_code == 200
    spare = base64.b64decode(r.json()["nonce"])
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                    json=bound.evidence(spare))
    assert r.status_code == 503 and "token" not in r.json()
    monkeypatch.undo()
    # Nothing was consumed by the refused attempt: the nonce still works once.
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                    json=bound.evidence(nonce))
    assert r.json()["status"] == "affirming"


def test_roles(client: TestClient, tenant: TenantKeys) -> None:
    r = client.post("/v1/attestation/challenge", headers=tenant.headers("auditor"), json={})
    assert r.status_code == 403
    assert client.post("/v1/attestation/challenge", json={}).status_code == 401


def test_second_machine_same_tenant(client: TestClient, tenant: TenantKeys,
                                    services: Services) -> None:
    other = make_machine()
    services.attestation.configure_trust(publishers=other.publisher.trust(),
                                         ek_roots=[other.manufacturer.cert])
    bind(client, tenant, other)
    nonce = nonce_for(client, tenant)
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"),
                    json=other.evidence(nonce))
    assert r.json()["status"] == "affirming", r.json()


def test_audit_failure_means_no_session(
    bound: SoftMachine, client: TestClient, tenant: TenantKeys, services: Services,
    submit: Submit, monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = submit()["token"]

    def broken(*_a: object, **_k: object) -> None:
        raise AuditUnavailableError("audit store is down")

    monkeypatch.setattr(services.audit_writer, "append", broken)
    h = tenant.headers("agent")
    r = client.post("/v1/sessions", headers=h, json={"attestation_token": token})
    assert r.status_code == 503
    monkeypatch.undo()
    # The refused start did not use the token up.
    r = client.post("/v1/sessions", headers=h, json={"attestation_token": token})
    assert r.status_code == 201, r.text


def test_concurrent_submissions_of_one_nonce_affirm_once(
    bound: SoftMachine, client: TestClient, tenant: TenantKeys, services: Services
) -> None:
    """Single use holds under a race: of several simultaneous submissions, one wins."""
    from concurrent.futures import ThreadPoolExecutor

    nonce = nonce_for(client, tenant)
    bodies = [bound.evidence(nonce, clock=3000 + i) for i in range(4)]

    def post(body: dict[str, Any]) -> dict[str, Any]:
        r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"), json=body)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(post, bodies))
    statuses = sorted(v["status"] for v in verdicts)
    assert statuses == ["affirming", "contraindicated", "contraindicated", "contraindicated"]
    for v in verdicts:
        if v["status"] == "contraindicated":
            # The losers lost on the nonce (and possibly on a clock the winner moved past).
            assert "attestation_nonce_replayed" in codes(v)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/attestation/verify", {"nonce": "", "quote": "", "signature": "", "ak_public": "",
                                    "pcrs": {}, "image_manifest": {}}),
        ("/v1/attestation/verify", {"nonce": "AAAA", "quote": "////", "signature": "AA==",
                                    "ak_public": "AAE=", "pcrs": {"sha256": {"0": "zz"}},
                                    "event_log": "AAAA", "image_manifest": "[[[[["}),
        ("/v1/attestation/verify", {"nonce": "AAAA", "quote": "AAAA", "signature": "AAAA",
                                    "ak_public": "AAAA", "pcrs": {"md5": {"99": "00"}},
                                    "image_manifest": {"payloadType": 1}}),
        ("/v1/attestation/verify", {"nonce": "AAAA", "quote": "AAAA", "signature": "AAAA",
                                    "ak_public": "AAAA", "pcrs": {"sha256": {"٣": "00"}},
                                    "image_manifest": "{}"}),
        ("/v1/attestation/ak/challenge", {"ak_public": "AAAA", "ek_certificate": "AAAA"}),
        ("/v1/attestation/ak/challenge", {"ak_public": "AAAA", "ek_certificate": "MAA=",
                                          "ek_public": "AAAA", "ek_intermediates": ["AAAA"]}),
        ("/v1/attestation/ak/activate", {"credential_id": "akc_x", "secret": "AAAA"}),
        ("/v1/sessions", {"attestation_token": "é.é.é"}),
        ("/v1/sessions", {"attestation_token": _b64url(b"[" * 9000) + ".e30.AAAA"}),
        ("/v1/sessions", {"attestation_token": ""}),
    ],
)
def test_hostile_bodies_get_reason_codes(client: TestClient, tenant: TenantKeys, path: str,
                                         body: dict[str, Any]) -> None:
    r = client.post(path, headers=tenant.headers("agent"), json=body)
    assert 400 <= r.status_code < 500 or (r.status_code == 200 and r.json()["failures"]), r.text
    if r.status_code != 200:
        assert r.json()["error"]["code"]
