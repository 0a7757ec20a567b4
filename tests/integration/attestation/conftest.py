"""Fixtures of the attestation API tests: trust roots, a software EK, a bound soft AK."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.support.pki import Issued, Publisher, make_ca, make_leaf, make_publisher
from tests.support.softtpm import (
    SoftAk,
    boot_log,
    make_manifest,
    marshal_quote,
    sign_quote,
    soft_activate,
    soft_session_evidence,
)

EK_EKU = x509.ObjectIdentifier("2.23.133.8.1")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class SoftMachine:
    """A sandbox with a software TPM: EK (certified), AK, a measured boot and its manifest."""

    ek_key: rsa.RSAPrivateKey
    ek_cert: x509.Certificate
    manufacturer: Issued
    publisher: Publisher
    ak: SoftAk
    log: bytes
    pcrs: dict[int, bytes]
    manifest: bytes

    @property
    def ek_der(self) -> bytes:
        return self.ek_cert.public_bytes(serialization.Encoding.DER)

    def evidence(self, nonce: bytes, **over: Any) -> dict[str, Any]:
        quote_kw = {k: over.pop(k) for k in ("reset", "restart", "clock", "safe") if k in over}
        q = marshal_quote(nonce, {"sha256": self.pcrs}, **quote_kw)
        body: dict[str, Any] = {
            "nonce": b64(nonce),
            "quote": b64(q),
            "signature": b64(sign_quote(self.ak, q)),
            "ak_public": b64(self.ak.public),
            "ek_certificate": b64(self.ek_der),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in self.pcrs.items()}},
            "event_log": b64(self.log),
            "image_manifest": self.manifest.decode(),
        }
        # A software session key certified by the soft AK (the real-TPM binding is tested in
        # tests/integration/sessions); the test client signs proofs with it.
        session_fields, _ = soft_session_evidence(self.ak, nonce)
        body.update(session_fields)
        body.update(over)
        return body


def make_machine() -> SoftMachine:
    manufacturer = make_ca("Test TPM Manufacturer CA", key_type="p256")
    ek_key = rsa.generate_private_key(65537, 2048)
    ek = make_leaf(manufacturer, "Test EK", key=ek_key, key_usage=("key_encipherment",),
                   eku=(EK_EKU,))
    publisher = make_publisher()
    log, pcrs, _ = boot_log(24)
    return SoftMachine(
        ek_key=ek_key, ek_cert=ek.cert, manufacturer=manufacturer, publisher=publisher,
        ak=SoftAk(), log=log, pcrs=pcrs, manifest=make_manifest(publisher, pcrs),
    )


_MACHINE = make_machine()


@pytest.fixture
def machine(services: Services) -> SoftMachine:
    """The software machine, with the service trusting its manufacturer and publisher."""
    services.attestation.configure_trust(
        publishers=_MACHINE.publisher.trust(), ek_roots=[_MACHINE.manufacturer.cert]
    )
    return _MACHINE


def bind(client: TestClient, tenant: TenantKeys, m: SoftMachine) -> dict[str, Any]:
    """Run the MakeCredential/ActivateCredential round for ``m``'s AK."""
    h = tenant.headers("agent")
    r = client.post("/v1/attestation/ak/challenge", headers=h,
                    json={"ak_public": b64(m.ak.public), "ek_certificate": b64(m.ek_der)})
    assert r.status_code == 200, r.text
    ch = r.json()
    secret = soft_activate(m.ek_key, m.ak.name, base64.b64decode(ch["credential_blob"]),
                           base64.b64decode(ch["encrypted_secret"]))
    r = client.post("/v1/attestation/ak/activate", headers=h,
                    json={"credential_id": ch["credential_id"], "secret": b64(secret)})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


@pytest.fixture
def bound(client: TestClient, tenant: TenantKeys, machine: SoftMachine) -> SoftMachine:
    bind(client, tenant, machine)
    return machine


def nonce_for(client: TestClient, tenant: TenantKeys) -> bytes:
    r = client.post("/v1/attestation/challenge", headers=tenant.headers("agent"), json={})
    assert r.status_code == 200, r.text
    return base64.b64decode(r.json()["nonce"])


Submit = Callable[..., dict[str, Any]]


@pytest.fixture
def submit(client: TestClient, tenant: TenantKeys, machine: SoftMachine) -> Submit:
    def run(nonce: bytes | None = None, *, who: TenantKeys | None = None,
            status: int = 200, **over: Any) -> dict[str, Any]:
        n = nonce if nonce is not None else nonce_for(client, who or tenant)
        r = client.post("/v1/attestation/verify", headers=(who or tenant).headers("agent"),
                        json=machine.evidence(n, **over))
        assert r.status_code == status, r.text
        out: dict[str, Any] = r.json()
        return out

    return run
