"""Hostile cases against a real vTPM (swtpm), one group per defect class of the review.

1. revocation reaches the EK chain (fingerprint, serial, CRL) for binding, verifying and
   starting sessions;
2. everything the allow-lists rely on is covered by the signed quote (a PCR left out of the
   quote, a bank the quote does not sign);
3. a structure that fails verification changes no state (an AK-signed forgery moving the
   stored clock);
7. the trust vector claims only checks that ran and passed;
8. CRLs: future thisUpdate, partial (issuingDistributionPoint), issuer without cRLSign,
   weak signature algorithm.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from fastapi.testclient import TestClient
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMT_SIG_SCHEME, TPMU_HA

from sandboxsec.attestation.eventlog import EventLogBuilder
from sandboxsec.attestation.trust import Revocations
from sandboxsec.attestation.x509chain import certificate_fingerprint
from sandboxsec.clock import FixedClock
from sandboxsec.sandbox import swtpm as sw
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.attestation.test_swtpm import (
    IMAGE,
    b64,
    bind,
    codes,
    evidence,
    manifest_for,
    nonce,
    verify,
)
from tests.support.pki import Issued, Publisher, make_ca, make_crl, make_leaf
from tests.support.softtpm import make_manifest
from tests.support.swtpm import booted

pytestmark = [
    pytest.mark.swtpm,
    pytest.mark.skipif(not sw.available(), reason="swtpm is not installed"),
]

EK_EKU = x509.ObjectIdentifier("2.23.133.8.1")
TODAY = datetime.now(UTC)


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    from tests.support.pki import make_publisher

    return make_publisher(not_before=TODAY - timedelta(days=1),
                          not_after=TODAY + timedelta(days=30))


@pytest.fixture(scope="module")
def manufacturer() -> Issued:
    """A TPM-manufacturer CA of our own (with cRLSign) that certifies the vTPM's real EK."""
    return make_ca("Hardening TPM Manufacturer CA", not_before=TODAY - timedelta(days=10),
                   not_after=TODAY + timedelta(days=365))


@pytest.fixture(scope="module")
def ek_cert(tpm: sw.SwTpm, manufacturer: Issued) -> x509.Certificate:
    real = x509.load_der_x509_certificate(tpm.ek_certificate())
    return make_leaf(manufacturer, "Hardening EK", public_key=real.public_key(),
                     key_usage=("key_encipherment",), eku=(EK_EKU,),
                     not_before=TODAY - timedelta(days=1),
                     not_after=TODAY + timedelta(days=30)).cert


def _der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def env(services: Services, clock: FixedClock, tpm: sw.SwTpm, publisher: Publisher,
        manufacturer: Issued) -> sw.SwTpm:
    clock.set(datetime.now(UTC))
    services.attestation.configure_trust(
        publishers=publisher.trust(),
        ek_roots=[tpm.ca_root, manufacturer.cert], ek_intermediates=[tpm.ca_issuer],
    )
    return tpm


def _trust(services: Services, tpm: sw.SwTpm, publisher: Publisher, manufacturer: Issued,
           *, revocations: Revocations | None = None,
           crls: tuple[x509.CertificateRevocationList, ...] = ()) -> None:
    store = publisher.trust(revocations).with_crls(crls)
    services.attestation.configure_trust(
        publishers=store, ek_roots=[tpm.ca_root, manufacturer.cert],
        ek_intermediates=[tpm.ca_issuer],
    )


def _bind_with(client: TestClient, tenant: TenantKeys, tpm: sw.SwTpm,
               cert: x509.Certificate, *, status: int = 200) -> dict[str, Any]:
    h = tenant.headers("agent")
    r = client.post("/v1/attestation/ak/challenge", headers=h, json={
        "ak_public": b64(tpm.ak()), "ek_certificate": b64(_der(cert)),
        "ek_public": b64(tpm.ek_public()),
    })
    if status != 200:
        assert r.status_code == status, r.text
        out: dict[str, Any] = r.json()
        return out
    assert r.status_code == 200, r.text
    ch = r.json()
    secret = tpm.activate(base64.b64decode(ch["credential_blob"]),
                          base64.b64decode(ch["encrypted_secret"]))
    r = client.post("/v1/attestation/ak/activate", headers=h,
                    json={"credential_id": ch["credential_id"], "secret": b64(secret)})
    assert r.status_code == 200, r.text
    done: dict[str, Any] = r.json()
    return done


def _evidence_with(tpm: sw.SwTpm, n: bytes, manifest: bytes,
                   cert: x509.Certificate) -> dict[str, Any]:
    body = evidence(tpm, n, manifest)
    body["ek_certificate"] = b64(_der(cert))
    return body


def _session(client: TestClient, tenant: TenantKeys, token: str) -> Any:
    return client.post("/v1/sessions", headers=tenant.headers("agent"),
                       json={"attestation_token": token})


# -- 1. revocation reaches every chain ---------------------------------------------------------


@pytest.mark.parametrize("how", ["fingerprint", "serial", "crl"])
def test_revoked_ek_stops_binding_attesting_and_sessions(
    how: str, env: sw.SwTpm, client: TestClient, tenant: TenantKeys, services: Services,
    publisher: Publisher, manufacturer: Issued, ek_cert: x509.Certificate,
) -> None:
    _bind_with(client, tenant, env, ek_cert)
    manifest = manifest_for(env, publisher)
    before = verify(client, tenant, _evidence_with(env, nonce(client, tenant), manifest, ek_cert))
    assert before["status"] == "affirming", before
    # The operator revokes the EK certificate in the trust configuration.
    revocations, crls = None, ()
    if how == "fingerprint":
        revocations = Revocations(fingerprints=frozenset({certificate_fingerprint(ek_cert)}))
    elif how == "serial":
        revocations = Revocations(serials=frozenset({ek_cert.serial_number}))
    else:
        crls = (make_crl(manufacturer, [ek_cert.serial_number],
                         this_update=TODAY - timedelta(hours=1),
                         next_update=TODAY + timedelta(days=7)),)
    _trust(services, env, publisher, manufacturer, revocations=revocations, crls=crls)
    # a. A session from the token issued before the revocation is refused.
    r = _session(client, tenant, before["token"])
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "cert_revoked"
    # b. The AK bound through the revoked EK no longer attests.
    after = verify(client, tenant, _evidence_with(env, nonce(client, tenant), manifest, ek_cert))
    assert after["status"] == "contraindicated"
    assert codes(after) == ["cert_revoked"]
    assert after["token"] is None
    # c. Binding again through it is refused.
    refused = _bind_with(client, tenant, env, ek_cert, status=422)
    assert refused["error"]["code"] == "cert_revoked"


def test_revoked_swtpm_ek_by_trust_directory(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, services: Services,
    publisher: Publisher,
) -> None:
    """The same through the files an operator edits: trust-roots/ and revocations/*.txt."""
    from cryptography.hazmat.primitives import serialization

    base = services.settings.resolved_trust_dir()
    pem = serialization.Encoding.PEM
    for sub, cert in (("publishers", publisher.root.cert),
                      ("tpm-manufacturers", env.ca_root), ("tpm-intermediates", env.ca_issuer)):
        (base / "trust-roots" / sub).mkdir(parents=True, exist_ok=True)
        (base / "trust-roots" / sub / "ca.pem").write_bytes(cert.public_bytes(pem))
    services.attestation.reload_trust()
    bind(client, tenant, env)
    manifest = manifest_for(env, publisher)
    assert verify(client, tenant, evidence(env, nonce(client, tenant), manifest))[
        "status"] == "affirming"
    fingerprint = hashlib.sha256(env.ek_certificate()).hexdigest()
    (base / "revocations").mkdir(parents=True, exist_ok=True)
    (base / "revocations" / "revoked.txt").write_text(f"cert-sha256:{fingerprint}\n")
    services.attestation.reload_trust()
    assert codes(verify(client, tenant, evidence(env, nonce(client, tenant), manifest))) == [
        "cert_revoked"]


# -- 2. coverage: the allow-lists rely only on what the TPM signed ----------------------------


def _quote(tpm: sw.SwTpm, n: bytes, selection: str) -> tuple[bytes, bytes]:
    handle = tpm.aks["ak"][0]
    attest, signature = tpm.esapi.quote(handle, selection, n,
                                        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    return bytes(attest), signature.marshal()


def test_pcr_pinned_by_event_digests_must_be_quoted(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, publisher: Publisher,
) -> None:
    """PCR 9 is pinned only by event digests; the sandbox leaves it out of its quote and
    sends the log of a boot it copied: nothing the TPM signed covers PCR 9."""
    assert env.boot is not None
    bind(client, tenant, env)
    firmware = {i: v for i, v in env.boot.pcrs.items() if i != 9}
    image_events = (hashlib.sha256(IMAGE).digest(),
                    hashlib.sha256(b"vendor-specific event").digest())
    manifest = make_manifest(publisher, firmware, event_digests={9: image_events},
                             image_digest="sha256:" + hashlib.sha256(IMAGE).hexdigest())
    n = nonce(client, tenant)
    attest, signature = _quote(env, n, "sha256:0,1,2,3,4,5,6,7")
    body = evidence(env, n, manifest)
    body.update(quote=b64(attest), signature=b64(signature),
                pcrs={"sha256": {str(i): v.hex() for i, v in firmware.items()}})
    verdict = verify(client, tenant, body)
    assert verdict["status"] == "contraindicated"
    assert codes(verdict) == ["pcr_reference_not_quoted"]
    assert verdict["trust_vector"]["executables"] == 96
    # The same evidence with PCR 9 in the quote is affirming (the rule, not the log, refused).
    n = nonce(client, tenant)
    attest, signature = _quote(env, n, "sha256:0,1,2,3,4,5,6,7,9")
    body = evidence(env, n, manifest)
    body.update(quote=b64(attest), signature=b64(signature))
    assert verify(client, tenant, body)["status"] == "affirming"


@pytest.fixture
def tpm384(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sw.SwTpm]:
    """A fresh vTPM with SHA-256 and SHA-384 banks (the test extends PCRs from their reset
    values, so one per test): the attack quotes only SHA-384."""
    with booted(tmp_path_factory.mktemp("swtpm384"), image=None,
                banks=("sha256", "sha384")) as device:
        yield device


def test_allow_list_uses_only_banks_the_quote_signed(
    services: Services, clock: FixedClock, tpm384: sw.SwTpm, client: TestClient,
    tenant: TenantKeys, publisher: Publisher,
) -> None:
    """The TPM booted an evil image (SHA-384 bank); the log carries the true SHA-384 digests
    and the SHA-256 digests of the allowed image.  The quote signs only SHA-384, so the
    SHA-256 digests the allow-list would check are covered by nothing."""
    tpm = tpm384
    clock.set(datetime.now(UTC))
    services.attestation.configure_trust(publishers=publisher.trust(), ek_roots=[tpm.ca_root],
                                         ek_intermediates=[tpm.ca_issuer])
    good, evil = IMAGE, b"evil image " * 100
    log = EventLogBuilder(("sha256", "sha384"))
    pcr0_384, pcr9_384 = bytes(48), bytes(48)
    for pcr, data256, data384 in ((0, b"firmware", b"firmware"), (9, good, evil)):
        digests = {"sha256": hashlib.sha256(data256).digest(),
                   "sha384": hashlib.sha384(data384).digest()}
        log.add(pcr, 0x0D, data384, digests=digests)
        tpm.esapi.pcr_extend(sw.ESYS_TR.parse(f"pcr{pcr}"), TPML_DIGEST_VALUES([
            TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digests["sha256"])),
            TPMT_HA(hashAlg=TPM2_ALG.SHA384, digest=TPMU_HA(sha384=digests["sha384"])),
        ]))
        if pcr == 0:
            pcr0_384 = hashlib.sha384(pcr0_384 + digests["sha384"]).digest()
        else:
            pcr9_384 = hashlib.sha384(pcr9_384 + digests["sha384"]).digest()
    bind(client, tenant, tpm)
    manifest = make_manifest(publisher, {}, banks={"sha384": {0: pcr0_384}},
                             event_digests={9: (hashlib.sha256(good).digest(),)},
                             image_digest="sha256:" + hashlib.sha256(good).hexdigest())
    n = nonce(client, tenant)
    attest, signature = _quote(tpm, n, "sha384:0,9")
    body = {
        "nonce": b64(n), "quote": b64(attest), "signature": b64(signature),
        "ak_public": b64(tpm.ak()), "ek_certificate": b64(tpm.ek_certificate()),
        "pcrs": {"sha384": {"0": pcr0_384.hex(), "9": pcr9_384.hex()}},
        "event_log": b64(log.to_bytes()), "image_manifest": manifest.decode(),
    }
    verdict = verify(client, tenant, body)
    assert verdict["status"] == "contraindicated", verdict
    assert "pcr_reference_not_quoted" in codes(verdict)


# -- 3. a structure that fails verification changes no state ----------------------------------


def _forged_attest(real: bytes, reset_count: int) -> bytes:
    """The quote with another magic (so the restricted AK will sign it) and a huge clock."""
    signer_len = struct.unpack_from(">H", real, 6)[0]
    extra_at = 8 + signer_len
    extra_len = struct.unpack_from(">H", real, extra_at)[0]
    clock_at = extra_at + 2 + extra_len
    out = bytearray(real)
    out[0:4] = b"\x00\x00\x00\x00"
    struct.pack_into(">QII", out, clock_at, 2**63, reset_count, 0)
    return bytes(out)


def test_ak_signed_forgery_does_not_move_the_stored_clock(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, publisher: Publisher,
) -> None:
    bind(client, tenant, env)
    manifest = manifest_for(env, publisher)
    n = nonce(client, tenant)
    body = evidence(env, n, manifest)
    forged = _forged_attest(base64.b64decode(body["quote"]), 2**32 - 1)
    # TPM2_Hash gives the ticket that lets the restricted AK sign a non-TPM-generated blob.
    digest, ticket = env.esapi.hash(forged, TPM2_ALG.SHA256, sw.ESYS_TR.ENDORSEMENT)
    signature = env.esapi.sign(env.aks["ak"][0], digest,
                               TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), ticket)
    body.update(quote=b64(forged), signature=b64(signature.marshal()))
    refused = verify(client, tenant, body)
    assert codes(refused) == ["quote_magic_invalid"]
    # The honest quote that follows is not refused as a rollback.
    honest = verify(client, tenant, evidence(env, nonce(client, tenant), manifest))
    assert honest["status"] == "affirming", honest


# -- 7. the trust vector claims only what was checked -----------------------------------------


def test_malformed_quote_claims_nothing_about_configuration(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, publisher: Publisher,
) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    body["quote"] = b64(base64.b64decode(body["quote"])[:-3])  # truncated pcrDigest
    verdict = verify(client, tenant, body)
    assert "quote_malformed" in codes(verdict)
    # No PCR was compared against a signed digest: configuration is "no claim", not 2.
    assert verdict["trust_vector"]["configuration"] == 0
    assert verdict["trust_vector"]["executables"] != 2


def test_trust_vector_is_affirming_only_for_checks_that_ran(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, publisher: Publisher,
) -> None:
    bind(client, tenant, env)
    body = evidence(env, nonce(client, tenant), manifest_for(env, publisher))
    body["signature"] = b64(b"\x00\x18\x00\x0b\x00\x01\x01")  # truncated TPMT_SIGNATURE
    verdict = verify(client, tenant, body)
    assert verdict["trust_vector"]["hardware"] == 96
    assert verdict["trust_vector"]["configuration"] == 0  # no signed digest to compare
    assert verdict["trust_vector"]["instance-identity"] == 0  # clock never checked


# -- 8. CRL correctness, on the vTPM's EK chain ------------------------------------------------


def _crl_case(case: str, manufacturer: Issued, serial: int) -> x509.CertificateRevocationList:
    other = 999999  # revokes something else: the CRL itself must be judged
    if case == "future":
        return make_crl(manufacturer, [other], this_update=TODAY + timedelta(days=1),
                        next_update=TODAY + timedelta(days=8))
    if case == "partial":
        idp = x509.IssuingDistributionPoint(
            full_name=None, relative_name=None, only_contains_user_certs=False,
            only_contains_ca_certs=True, only_some_reasons=None, indirect_crl=False,
            only_contains_attribute_certs=False,
        )
        return make_crl(manufacturer, [other], this_update=TODAY - timedelta(hours=1),
                        next_update=TODAY + timedelta(days=7), extensions=[(idp, True)])
    if case == "sha224":
        return make_crl(manufacturer, [other], this_update=TODAY - timedelta(hours=1),
                        next_update=TODAY + timedelta(days=7),
                        hash_alg=hashes.SHA224())  # outside the SHA-2 256+ policy
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "code"),
    [("future", "cert_crl_not_yet_valid"), ("partial", "cert_crl_scope_unsupported"),
     ("sha224", "cert_crl_algorithm_unsupported")],
)
def test_bad_crl_for_the_ek_issuer_is_refused(
    case: str, code: str, env: sw.SwTpm, client: TestClient, tenant: TenantKeys,
    services: Services, publisher: Publisher, manufacturer: Issued, ek_cert: x509.Certificate,
) -> None:
    _trust(services, env, publisher, manufacturer,
           crls=(_crl_case(case, manufacturer, ek_cert.serial_number),))
    refused = _bind_with(client, tenant, env, ek_cert, status=422)
    assert refused["error"]["code"] == code


def test_crl_from_the_swtpm_ca_without_crl_sign_is_refused(
    env: sw.SwTpm, client: TestClient, tenant: TenantKeys, services: Services,
    publisher: Publisher, manufacturer: Issued,
) -> None:
    """swtpm's local CA has keyUsage keyCertSign only: a CRL it signs cannot revoke or
    vouch for anything, and its presence fails the chain closed."""
    from cryptography.hazmat.primitives import serialization

    text = (env.directory / "ca" / "signkey.pem").read_bytes()
    key = serialization.load_pem_private_key(text[text.index(b"-----BEGIN"):], None)
    issuer = Issued(env.ca_issuer, key)  # type: ignore[arg-type]
    crl = make_crl(issuer, [999999], this_update=TODAY - timedelta(hours=1),
                   next_update=TODAY + timedelta(days=7))
    _trust(services, env, publisher, manufacturer, crls=(crl,))
    r = client.post("/v1/attestation/ak/challenge", headers=tenant.headers("agent"), json={
        "ak_public": b64(env.ak()), "ek_certificate": b64(env.ek_certificate()),
    })
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "cert_crl_issuer_not_crl_signer"
