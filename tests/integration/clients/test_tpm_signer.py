"""The client's TPM session-key signer against a real TPM (swtpm): what it signs verifies
under an independent verifier (also when ``r`` or ``s`` has leading zero bytes, which a
DER-to-DER round trip would hide), and another process reaches the key by its persistent
handle or its saved context."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from sandboxsec_client import TpmSessionKey
from sandboxsec_client.proofs import create_proof, jwk_thumbprint
from tpm2_pytss.constants import ESYS_TR

from sandboxsec.attestation.certify import parse_session_key
from sandboxsec.sandbox import swtpm as sw
from sandboxsec.sessions import dpop

pytestmark = [pytest.mark.swtpm,
              pytest.mark.skipif(not sw.available(), reason="swtpm is not installed")]

HANDLE = 0x81000101


@pytest.fixture
def device(tmp_path: Path) -> Iterator[sw.SwTpm]:
    (tmp_path / "tpm").mkdir()
    tpm = sw.start_swtpm(tmp_path / "tpm")
    try:
        yield tpm
    finally:
        with contextlib.suppress(Exception):
            tpm.esapi.close()
        tpm.process.terminate()
        tpm.process.wait(timeout=10)


def _verify(jwk: dict[str, str], message: bytes, raw: bytes) -> None:
    x = dpop._unb64url(jwk["x"], "x")
    y = dpop._unb64url(jwk["y"], "y")
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.verify(der, message, ec.ECDSA(hashes.SHA256()))


def test_signatures_verify_independently_even_with_leading_zeros(device: sw.SwTpm) -> None:
    public = device.new_session_key()
    assert device.session_key_handle is not None
    signer = TpmSessionKey.of(device.esapi, device.session_key_handle)
    assert dict(signer.jwk) == parse_session_key(public).jwk
    short = 0
    for i in range(4000):
        message = f"proof {i}".encode()
        raw = signer.sign(message)
        assert len(raw) == 64
        _verify(dict(signer.jwk), message, raw)
        if raw[0] == 0 or raw[32] == 0:  # r or s was shorter than 32 bytes from the TPM
            short += 1
            if short == 2:
                break
    assert short == 2, "no signature with a short r or s in 4000 tries"
    # and the proofs it signs verify at the service's checker
    proof = create_proof(signer.sign, signer.jwk, method="POST",
                         url="https://svc.example/v1/actions", session_id="ses_1",
                         body=b"{}", iat=int(datetime.now(UTC).timestamp()), api_key="k")
    dpop.verify_proof(proof, method="POST", url="https://svc.example/v1/actions", body=b"{}",
                      session_id="ses_1", jkt=jwk_thumbprint(signer.jwk),
                      now=datetime.now(UTC), max_age_seconds=60, skew_seconds=5,
                      api_key="k")


def test_another_process_reaches_the_key_by_context_or_handle(device: sw.SwTpm) -> None:
    device.new_session_key()
    assert device.session_key_handle is not None
    mine = TpmSessionKey.of(device.esapi, device.session_key_handle)
    context = mine.save_context()
    device.esapi.evict_control(ESYS_TR.OWNER, device.session_key_handle, HANDLE)
    # swtpm serves one connection at a time: this one lets go first
    device.esapi.close()
    tcti = f"swtpm:host=127.0.0.1,port={device.port}"
    for how in ({"context": context}, {"handle": HANDLE}):
        with TpmSessionKey.open(tcti, **how) as other:  # type: ignore[arg-type]
            assert dict(other.jwk) == dict(mine.jwk)
            _verify(dict(other.jwk), b"m", other.sign(b"m"))
    # what is not the key is refused, never replaced by something else
    with pytest.raises(Exception):  # noqa: B017 - the TSS's own error type
        TpmSessionKey.open(tcti, handle=HANDLE + 1)
    with pytest.raises(Exception):  # noqa: B017
        TpmSessionKey.open(tcti, context=context[:-3])
    for bad in ({}, {"handle": HANDLE, "context": context}, {"handle": 0x80000001}):
        with pytest.raises(ValueError):
            TpmSessionKey.open(tcti, **bad)  # type: ignore[arg-type]
