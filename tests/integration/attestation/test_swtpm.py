"""End to end against a real software TPM (swtpm): binding, quotes, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.attestation.certify import parse_session_key
from sandboxsec.clock import FixedClock
from sandboxsec.sandbox import swtpm as sw
from sandboxsec.services import Services
from sandboxsec.sessions import dpop
from tests.conftest import TenantKeys
from tests.support.pki import Publisher, make_ca, make_publisher
from tests.support.softtpm import make_manifest
from tests.support.swtpm import IMAGE

pytestmark = [
    pytest.mark.swtpm,
    pytest.mark.skipif(not sw.available(), reason="swtpm is not installed"),
]

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    now = datetime.now(UTC)
    return make_publisher(not_before=now - timedelta(days=1), not_after=now + timedelta(days=30))


def manifest_for(tpm: sw.SwTpm, publisher: Publisher, image: bytes = IMAGE, **kw: Any) -> bytes:
    assert tpm.boot is not None
    reference = dict(tpm.boot.pcrs)
    if image != IMAGE:
        # What a boot of this other image would measure into PCR 9.
        reference[9] = tpm.expected_pcr9(image)
    return make_manifest(publisher, reference,
                         image_digest="sha256:" + hashlib.sha256(image).hexdigest(), **kw)


@pytest.fixture
def env(services: Services, clock: FixedClock, tpm: sw.SwTpm,
        publisher: Publisher) -> sw.SwTpm:
    # The EK certificates were issued just now by the swtpm local CA: use real time.
    clock.set(datetime.now(UTC))
    services.attestation.configure_trust(
        publishers=publisher.trust(), ek_roots=[tpm.ca_root], ek_intermediates=[tpm.ca_issuer]
    )
    return tpm


def bind(client: TestClient, tenant: TenantKeys, tpm: sw.SwTpm, label: str = "ak", *,
         ek_nv: int = sw.RSA_EK_CERT_NV, ek_handle: int = sw.RSA_EK_HANDLE) -> dict[str, Any]:
    h = tenant.headers("agent")
    r = client.post("/v1/attestation/ak/challenge", headers=h, json={
        "ak_public": b64(tpm.ak(label)), "ek_certificate": b64(tpm.ek_certificate(ek_nv)),
        "ek_public": b64(tpm.ek_public(ek_handle)),
    })
    assert r.status_code == 200, r.text
    ch = r.json()
    assert ch["ak_name"] == tpm.ak_name(label).hex()
    secret = tpm.activate(base64.b64decode(ch["credential_blob"]),
                          base64.b64decode(ch["encrypted_secret"]), label=label,
                          ek_handle=ek_handle)
    r = client.post("/v1/attestation/ak/activate", headers=h,
                    json={"credential_id": ch["credential_id"], "secret": b64(secret)})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def nonce(client: TestClient, tenant: TenantKeys) -> bytes:
    r = client.post("/v1/attestation/challenge", headers=tenant.headers("agent"), json={})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["nonce"])


def evidence(tpm: sw.SwTpm, n: bytes, manifest: bytes, label: str = "ak") -> dict[str, Any]:
    assert tpm.boot is not None
    attest, signature = tpm.quote(n, label)
    return {
        "nonce": b64(n), "quote": b64(attest), "signature": b64(signature),
        "ak_public": b64(tpm.ak(label)), "ek_certificate": b64(tpm.ek_certificate()),
        "pcrs": {"sha256": {str(i): v.hex() for i, v in tpm.read_pcrs().items()}},
        "event_log": b64(tpm.boot.log), "image_manifest": manifest.decode(),
    }


def verify(client: TestClient, tenant: TenantKeys, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"), json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def codes(verdict: dict[str, Any]) -> list[str]:
    return [f["code"] for f in verdict["failures"]]


def flip_b64(value: str, index: int) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 1
    return b64(bytes(raw))


def test_real_tpm_affirming_and_session(env: sw.SwTpm, client: TestClient,
                                        tenant: TenantKeys, publisher: Publisher,
                                        request: pytest.FixtureRequest) -> None:
    assert bind(client, tenant, env)["bound"] is True
    verdict = verify(client, tenant, evidence(env, nonce(client, tenant),
                                              manifest_for(env, publisher)))
    assert verdict["status"] == "affirming", verdict
    # The unknown vendor event replayed by its digest and is named.
    assert verdict["unknown_event_types"] == ["UNKNOWN_0x0000abcd"]
    assert set(verdict["trust_vector"].values()) == {2}
    # Without a TPM-held session key the token starts no session (the bound flow is in
    # tests/integration/sessions).
    r = client.post("/v1/sessions", headers=tenant.headers("agent"),
                    json={"attestation_token": verdict["token"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "session_key_required"
    n = nonce(client, tenant)
    body = evidence(env, n, manifest_for(env, publisher))
    public = env.new_session_key()
    # The vTPM holds three transient objects: the other tests of this module need the room.
    request.addfinalizer(env.drop_session_key)
    attest, signature = env.certify_session_key(n)
    body |= {"session_key": b64(public), "session_key_certify": b64(attest),
             "session_key_signature": b64(signature)}
    verdict = verify(client, tenant, body)
    assert verdict["status"] == "affirming", verdict
    jwk = parse_session_key(public).jwk
    content = json.dumps({"attestation_token": verdict["token"]}).encode()
    proof = dpop.create_proof(env.sign_session, jwk, method="POST",
                              url="http://testserver/v1/sessions",
                              session_id=verdict["attestation_id"], body=content,
                              now=datetime.now(UTC), api_key=tenant.keys["agent"])
    r = client.post("/v1/sessions", content=content, headers={
        **tenant.headers("agent"), "Content-Type": "application/json", "DPoP": proof})
    assert r.status_code == 201, r.text
    assert r.json()["key_thumbprint"] == dpop.jwk_thumbprint(jwk)
    assert r.json()["ak_name"] == env.ak_name().hex()
    assert r.json()["image_digest"] == "sha256:" + hashlib.sha256(IMAGE).hexdigest()


@pytest.mark.parametrize(
    ("field", "index", "code"),
    [
        ("quote", 90, "quote_signature_invalid"),  # a bit of the signed clock
        ("signature", 10, "quote_signature_invalid"),
        ("nonce", 0, "quote_nonce_mismatch"),
    ],
)
def test_real_tpm_flipped_bits(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                               publisher: Publisher, field: str, index: int, code: str) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    body[field] = flip_b64(body[field], index)
    found = codes(verify(client, tenant, body))
    assert code in found
    if field == "nonce":  # a flipped nonce is also a nonce nobody issued
        assert set(found) == {"attestation_nonce_unknown", "quote_nonce_mismatch"}
    else:
        assert found == [code]


def test_real_tpm_flipped_pcr_value(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                    publisher: Publisher) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    value = bytearray.fromhex(body["pcrs"]["sha256"]["9"])
    value[0] ^= 1
    body["pcrs"]["sha256"]["9"] = value.hex()
    found = codes(verify(client, tenant, body))
    assert found[0] == "quote_pcr_digest_mismatch"
    assert "pcr_reference_mismatch" in found


def test_real_tpm_flipped_image_byte(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                     publisher: Publisher) -> None:
    """The publisher signed an image one byte away from the one that booted."""
    bind(client, tenant, env)
    other = bytearray(IMAGE)
    other[1000] ^= 1
    manifest = manifest_for(env, publisher, bytes(other))
    assert codes(verify(client, tenant, evidence(env, nonce(client, tenant), manifest))) == [
        "pcr_reference_mismatch"
    ]


def test_real_tpm_flipped_manifest_bit(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                       publisher: Publisher) -> None:
    import json

    bind(client, tenant, env)
    envelope = json.loads(manifest_for(env, publisher))
    envelope["payload"] = flip_b64(envelope["payload"], 40)
    body = evidence(env, nonce(client, tenant), b"{}")
    body["image_manifest"] = envelope
    assert codes(verify(client, tenant, body)) == ["image_signature_invalid"]


def test_real_tpm_replayed_and_foreign_nonce(env: sw.SwTpm, client: TestClient,
                                             tenant: TenantKeys, other_tenant: TenantKeys,
                                             publisher: Publisher) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    assert verify(client, tenant, body)["status"] == "affirming"
    assert codes(verify(client, tenant, body)) == ["attestation_nonce_replayed"]
    foreign = evidence(env, nonce(client, other_tenant), manifest_for(env, publisher))
    assert codes(verify(client, tenant, foreign)) == ["attestation_nonce_unknown"]


def test_real_tpm_expired_nonce(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                publisher: Publisher, clock: FixedClock,
                                services: Services) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    clock.advance(services.settings.nonce_ttl_seconds)
    assert codes(verify(client, tenant, body)) == ["attestation_nonce_expired"]


def test_real_tpm_unbound_ak(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                             publisher: Publisher) -> None:
    env.ak("unbound", hierarchy=sw.ESYS_TR.OWNER)  # another key than the bound AK
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher), "unbound")
    assert codes(verify(client, tenant, body)) == ["ak_not_bound"]


def test_real_tpm_ek_from_untrusted_ca(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                       services: Services, publisher: Publisher) -> None:
    services.attestation.configure_trust(ek_roots=[make_ca("Some Other TPM Vendor").cert])
    r = client.post("/v1/attestation/ak/challenge", headers=tenant.headers("agent"), json={
        "ak_public": b64(env.ak()), "ek_certificate": b64(env.ek_certificate()),
    })
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "cert_untrusted_issuer"


def test_real_tpm_wrong_ak_cannot_activate(env: sw.SwTpm, client: TestClient,
                                           tenant: TenantKeys) -> None:
    """A credential made for one AK name does not activate with another AK loaded."""
    env.ak("second", hierarchy=sw.ESYS_TR.OWNER)
    r = client.post("/v1/attestation/ak/challenge", headers=tenant.headers("agent"), json={
        "ak_public": b64(env.ak("second")), "ek_certificate": b64(env.ek_certificate()),
    })
    ch = r.json()
    with pytest.raises(Exception, match="integrity"):
        env.activate(base64.b64decode(ch["credential_blob"]),
                     base64.b64decode(ch["encrypted_secret"]), label="ak")


def test_real_tpm_ecc_p384_ek_binding(env: sw.SwTpm, client: TestClient,
                                      tenant: TenantKeys) -> None:
    out = bind(client, tenant, env, ek_nv=sw.ECC_EK_CERT_NV, ek_handle=sw.ECC_EK_HANDLE)
    assert out == {"ak_name": env.ak_name().hex(), "bound": True}


def test_real_tpm_downgraded_hash(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                  publisher: Publisher) -> None:
    env.ak("sha1", scheme="ecdsa-sha1")
    bind(client, tenant, env, "sha1")
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher), "sha1")
    assert codes(verify(client, tenant, body)) == ["quote_algorithm_refused"]


def test_real_tpm_event_log_that_does_not_replay(env: sw.SwTpm, client: TestClient,
                                                 tenant: TenantKeys,
                                                 publisher: Publisher) -> None:
    from sandboxsec.attestation.eventlog import EventLogBuilder

    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    forged = EventLogBuilder()
    forged.add(9, 0x0D, IMAGE)  # claims only the image ran: firmware events omitted
    body["event_log"] = b64(forged.to_bytes())
    assert codes(verify(client, tenant, body)) == ["eventlog_replay_mismatch"]


def test_real_tpm_reset_count_rollback(env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
                                       publisher: Publisher) -> None:
    """A quote taken before a reboot, held back and sent after a newer one, is stale."""
    bind(client, tenant, env)
    manifest = manifest_for(env, publisher)
    held = evidence(env, nonce(client, tenant), manifest)
    env.reboot()
    fresh = evidence(env, nonce(client, tenant), manifest)
    assert verify(client, tenant, fresh)["status"] == "affirming"
    assert codes(verify(client, tenant, held)) == ["quote_clock_rollback"]


def test_real_tpm_event_digest_allow_list(env: sw.SwTpm, client: TestClient,
                                          tenant: TenantKeys, publisher: Publisher) -> None:
    bind(client, tenant, env)
    image_event = hashlib.sha256(IMAGE).digest()
    vendor_event = hashlib.sha256(b"vendor-specific event").digest()
    both = manifest_for(env, publisher, event_digests={9: (image_event, vendor_event)})
    verdict = verify(client, tenant, evidence(env, nonce(client, tenant), both))
    assert verdict["status"] == "affirming", verdict
    only_image = manifest_for(env, publisher, event_digests={9: (image_event,)})
    verdict = verify(client, tenant, evidence(env, nonce(client, tenant), only_image))
    assert codes(verdict) == ["eventlog_digest_not_allowed"]


def test_real_tpm_32_byte_nonce_and_ak_bound_nonce(env: sw.SwTpm, client: TestClient,
                                                   tenant: TenantKeys,
                                                   publisher: Publisher) -> None:
    """The nonce fits the qualifying data of a TPM with only SHA-256 banks (32 bytes); the
    TPM signs it whole (extraData equals it byte for byte), and a nonce bound to an AK is
    answered by that AK's quote only."""
    bind(client, tenant, env)
    manifest = manifest_for(env, publisher)
    n = nonce(client, tenant)
    assert len(n) == 32
    assert verify(client, tenant, evidence(env, n, manifest))["status"] == "affirming"
    h = tenant.headers("agent")
    r = client.post("/v1/attestation/challenge", headers=h,
                    json={"ak_name": env.ak_name().hex()})
    assert r.status_code == 200, r.text
    mine = base64.b64decode(r.json()["nonce"])
    assert len(mine) == 32
    assert verify(client, tenant, evidence(env, mine, manifest))["status"] == "affirming"
    other_name = b"\x00\x0b" + hashlib.sha256(b"another TPM's AK").digest()
    r = client.post("/v1/attestation/challenge", headers=h, json={"ak_name": other_name.hex()})
    theirs = base64.b64decode(r.json()["nonce"])
    assert codes(verify(client, tenant, evidence(env, theirs, manifest))) == [
        "attestation_nonce_unknown"]
