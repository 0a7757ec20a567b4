"""The client's session proofs are the ones the service verifies, byte for byte; the prover
finds the session each request acts in; the software signer says what it is."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from sandboxsec_client import InsecureSignerWarning, SessionProver, SoftwareP256Signer
from sandboxsec_client.proofs import create_proof, jwk_thumbprint, session_key_jwk

from sandboxsec.attestation.certify import parse_session_key
from sandboxsec.sessions import dpop
from sandboxsec.sessions.errors import DpopBodyMismatchError, DpopUrlMismatchError
from tests.support.softtpm import soft_session_key_public

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
URL = "https://svc.example/v1/actions"


def _signer() -> SoftwareP256Signer:
    with pytest.warns(InsecureSignerWarning):
        return SoftwareP256Signer()


def _verify(proof: str, signer: SoftwareP256Signer, *, url: str = URL, body: bytes = b"{}",
            sid: str = "ses_1", method: str = "POST") -> dpop.VerifiedProof:
    return dpop.verify_proof(proof, method=method, url=url, body=body, session_id=sid,
                             jkt=jwk_thumbprint(signer.jwk), now=NOW, max_age_seconds=60,
                             skew_seconds=5, api_key="key")


def test_client_proofs_verify_at_the_service() -> None:
    signer = _signer()
    assert jwk_thumbprint(signer.jwk) == dpop.jwk_thumbprint(signer.jwk)
    proof = create_proof(signer.sign, signer.jwk, method="post", url=URL + "?x=1",
                         session_id="ses_1", body=b"{}", iat=int(NOW.timestamp()),
                         api_key="key")
    verified = _verify(proof, signer)
    assert (verified.htm, verified.htu, verified.session_id) == ("POST", URL, "ses_1")
    with pytest.raises(DpopBodyMismatchError):
        _verify(proof, signer, body=b'{"a":1}')
    with pytest.raises(DpopUrlMismatchError):
        _verify(proof, signer, url="https://svc.example/v1/sessions")


def test_session_key_jwk_reads_the_tpm_public_area_as_the_service_does() -> None:
    signer = _signer()
    x = base64.urlsafe_b64decode(signer.jwk["x"] + "=")
    y = base64.urlsafe_b64decode(signer.jwk["y"] + "=")
    public = soft_session_key_public(x, y)
    assert session_key_jwk(public) == parse_session_key(public).jwk == dict(signer.jwk)
    for bad in (public[:-1], public + b"\0", b"\x00\x02\x00\x01", b""):
        with pytest.raises(ValueError):
            session_key_jwk(bad)
    rsa = public[:2] + b"\x00\x01" + public[4:]  # type RSA, same length
    with pytest.raises(ValueError):
        session_key_jwk(rsa)


def _token(jti: str) -> str:
    part = base64.urlsafe_b64encode(json.dumps({"jti": jti}).encode()).rstrip(b"=").decode()
    return f"e30.{part}.sig"


def test_prover_signs_only_requests_acting_in_a_session() -> None:
    signer = _signer()
    prover = SessionProver("key", None, now=NOW.timestamp)
    assert prover("POST", URL, b'{"session_id":"ses_1"}') is None  # no key yet
    prover.attach(signer, "ses_9")
    base = "https://svc.example"
    cases = [
        ("POST", f"{base}/v1/actions", b'{"session_id":"ses_1"}', "ses_1"),
        ("POST", f"{base}/v1/sessions/ses_2/trajectory", b"{}", "ses_2"),
        ("POST", f"{base}/v1/sessions/ses_3/end", b"", "ses_3"),
        ("POST", f"{base}/v1/sessions",
         json.dumps({"attestation_token": _token("att_7")}).encode(), "att_7"),
        ("GET", f"{base}/v1/approvals/apr_1/wait", b"", "ses_9"),
        ("GET", f"{base}/v1/tenant", b"", None),
        ("POST", f"{base}/v1/grants/verify", b'{"grant":"g"}', None),
    ]
    for method, url, body, sid in cases:
        proof = prover(method, url, body)
        if sid is None:
            assert proof is None, url
        else:
            assert proof is not None, url
            _verify(proof, signer, url=url, body=body, sid=sid, method=method)


def test_prover_names_the_service_url_behind_a_forwarder() -> None:
    signer = _signer()
    prover = SessionProver("key", signer, htu_base="https://svc.example",
                           now=NOW.timestamp)
    proof = prover("POST", "http://127.0.0.1:9999/v1/actions", b'{"session_id":"ses_1"}')
    assert proof is not None
    _verify(proof, signer, body=b'{"session_id":"ses_1"}')
