"""sandboxsec-client without a network: the retry decisions, the proof hook, and the offline
grant checks cross-checked against the service's own encoder and canonical form."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st
from sandboxsec_client import GrantInvalid, OutcomeUnknownError, UnavailableError
from sandboxsec_client._core import Answer, Call, LongPoll, RetryPolicy, Session
from sandboxsec_client.errors import InputError, ServerError, TransportError
from sandboxsec_client.grants import canonical_json, parse_published_keys, verify_offline

from sandboxsec.policy.canonical import canonical_json as service_canonical_json
from sandboxsec.policy.errors import ParamsNotCanonicalError, ParamsTooLargeError
from sandboxsec.policy.grants import GrantClaims, encode_grant, key_id

NOW = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
KEY = Ed25519PrivateKey.generate()
PARAMS = {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh"}


def _session(**kw: Any) -> Session:
    return Session("http://svc", "ssk_key", timeout=5, retry=RetryPolicy(**kw), proof=None)


def _answer(status: int, code: str = "x", retry_after: str | None = None) -> Answer:
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    body = json.dumps({"error": {"code": code, "message": "m"}}).encode()
    return Answer(status, headers, body)


def test_503_is_retried_after_retry_after_for_every_method() -> None:
    s = _session(attempts=3)
    post = Call("POST", "/v1/actions", {})
    assert s.after_answer(post, _answer(503, "database_unavailable", "1"), 1) == 1.0
    assert s.after_answer(post, _answer(429, "rate_limited", "2"), 2) == 2.0
    with pytest.raises(UnavailableError) as last:
        s.after_answer(post, _answer(503, "database_unavailable", "1"), 3)
    assert (last.value.code, last.value.retry_after) == ("database_unavailable", 1.0)
    # a Retry-After longer than we are willing to wait is handed to the caller at once
    with pytest.raises(UnavailableError):
        _session(max_retry_after=5).after_answer(post, _answer(503, "x", "600"), 1)


def test_other_5xx_retried_only_when_repeating_is_harmless() -> None:
    s = _session()
    assert isinstance(s.after_answer(Call("GET", "/v1/approvals"), _answer(502), 1), float)
    with pytest.raises(ServerError):
        s.after_answer(Call("POST", "/v1/actions", {}), _answer(502), 1)
    with pytest.raises(InputError):
        s.after_answer(Call("GET", "/v1/approvals"), _answer(400, "invalid_input"), 1)


def test_lost_answers() -> None:
    s = _session(attempts=2)
    post = Call("POST", "/v1/sessions/s/trajectory", {})
    lost = httpx.ReadError("reset")
    # never sent: safe to try again; sent: the outcome is unknown, never repeated
    assert isinstance(s.after_failure(post, httpx.ConnectError("refused"), 1, sent=False),
                      float)
    with pytest.raises(OutcomeUnknownError):
        s.after_failure(post, lost, 1, sent=True)
    assert isinstance(s.after_failure(Call("GET", "/v1/x"), lost, 1, sent=True), float)
    with pytest.raises(TransportError):
        s.after_failure(Call("GET", "/v1/x"), lost, 2, sent=True)


def test_long_poll_reconnects_until_its_deadline_and_asks_only_for_what_is_left() -> None:
    clock = [100.0]
    s = Session("http://svc", "k", timeout=5, retry=RetryPolicy(attempts=1), proof=None,
                monotonic=lambda: clock[0])
    call = Call("GET", "/v1/approvals/a/wait", long_poll=LongPoll(deadline=160.0, step=30.0))
    assert s.prepare(call).params["timeout"] == "30.000"
    for attempt in range(1, 20):  # many more than `attempts`: the deadline governs
        assert isinstance(s.after_failure(call, httpx.ReadError("x"), attempt, sent=True),
                          float)
    clock[0] = 150.0
    assert s.prepare(call).params["timeout"] == "10.000"
    clock[0] = 160.0
    with pytest.raises(TransportError):
        s.after_failure(call, httpx.ReadError("x"), 20, sent=True)


def test_proof_signer_sees_method_target_and_exact_body() -> None:
    seen: list[tuple[str, str, bytes]] = []

    def proof(method: str, url: str, body: bytes) -> str:
        seen.append((method, url, body))
        return f"proof-{len(seen)}"

    s = Session("https://svc.example/", "k", timeout=5, retry=RetryPolicy(), proof=proof)
    p1 = s.prepare(Call("POST", "/v1/actions", {"b": 1, "a": "é"}))
    p2 = s.prepare(Call("GET", "/v1/approvals/x/wait",
                        long_poll=LongPoll(deadline=1e12, step=5)))
    assert seen[0] == ("POST", "https://svc.example/v1/actions", p1.content)
    assert seen[1] == ("GET", "https://svc.example/v1/approvals/x/wait", b"")
    assert (p1.headers["DPoP"], p2.headers["DPoP"]) == ("proof-1", "proof-2")
    assert p1.headers["Authorization"] == "Bearer k"
    # no key and no proof on public calls
    p3 = s.prepare(Call("GET", "/v1/grants/keys", auth=False))
    assert "Authorization" not in p3.headers and "DPoP" not in p3.headers


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_canonical_form_matches_the_service(value: Any) -> None:
    try:
        expected = service_canonical_json(value)
    except (ParamsNotCanonicalError, ParamsTooLargeError):
        with pytest.raises(ValueError):
            canonical_json(value)
        return
    assert canonical_json(value) == expected


@pytest.mark.parametrize("value", [1.5, 2**53, {"a": float("nan")}, "\ud800"])
def test_values_without_one_spelling_are_refused(value: Any) -> None:
    with pytest.raises(ValueError):
        canonical_json(value)


def _claims(**kw: Any) -> GrantClaims:
    from sandboxsec.policy.canonical import params_hash

    base: dict[str, Any] = {
        "grant_id": "grt_1", "tenant_id": "ten_1", "session_id": "ses_1", "action": "payment",
        "resource": "payee:acme-gmbh", "params_hash": params_hash(PARAMS),
        "approval_id": "apr_1", "issued_at": NOW, "expires_at": NOW + timedelta(minutes=5),
        "key_id": key_id(KEY.public_key())}
    return GrantClaims(**{**base, **kw})


def _keys() -> dict[str, Any]:
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return parse_published_keys({"keys": {key_id(KEY.public_key()): base64.b64encode(raw)
                                          .decode()}})


def test_offline_check_of_a_service_grant() -> None:
    token = encode_grant(_claims(), KEY)
    claims = verify_offline(token, _keys(), action="payment", params=PARAMS,
                            resource="payee:acme-gmbh", now=NOW)
    assert (claims.grant_id, claims.approval_id) == ("grt_1", "apr_1")
    # the same key published as a JWKS (the shape a JOSE grant format would use)
    raw = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    jwks = parse_published_keys({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "kid": key_id(KEY.public_key()),
         "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()},
        {"kty": "RSA", "kid": "ignored", "n": "AQAB", "e": "AQAB"}]})
    assert set(jwks) == {key_id(KEY.public_key())}
    verify_offline(token, jwks, action="payment", params=PARAMS, now=NOW)


def _resign(payload: dict[str, Any], key: Ed25519PrivateKey = KEY, canonical: bool = True) -> str:
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    body = canonical_json(payload) if canonical else json.dumps(payload).encode()
    header = {"alg": "EdDSA", "kid": payload["kid"], "typ": "sandboxsec-grant+jws"}
    signing = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    return f"{signing}.{b64(key.sign(signing.encode()))}"


@pytest.mark.parametrize(("mutate", "code"), [
    # One character inside the signature (the last one carries padding bits, which a strict
    # decoder refuses as malformed before any signature is checked).
    (lambda t, p: t[:-5] + ("A" if t[-5] != "A" else "B") + t[-4:], "grant_signature_invalid"),
    (lambda t, p: "sgr2" + t[4:], "grant_malformed"),
    (lambda t, p: t + ".x", "grant_malformed"),
    (lambda t, p: _resign(p, Ed25519PrivateKey.generate()), "grant_signature_invalid"),
    (lambda t, p: _resign({**p, "kid": "0" * 16}), "grant_signature_invalid"),
    (lambda t, p: _resign(p, canonical=False), "grant_malformed"),
    (lambda t, p: _resign({**p, "extra": 1}), "grant_malformed"),
])
def test_tampered_grants_are_refused_with_their_reason(mutate: Any, code: str) -> None:
    claims = _claims()
    token = mutate(encode_grant(claims, KEY), claims.payload())
    with pytest.raises(GrantInvalid) as bad:
        verify_offline(token, _keys(), action="payment", params=PARAMS, now=NOW)
    assert bad.value.code == code


def test_claims_are_compared_to_what_is_about_to_run() -> None:
    token = encode_grant(_claims(), KEY)
    for kw, code in (
        ({"params": {**PARAMS, "amount": "120.01"}}, "grant_params_mismatch"),
        ({"action": "login"}, "grant_action_mismatch"),
        ({"resource": "payee:mallory"}, "grant_resource_mismatch"),
        ({"now": NOW + timedelta(minutes=5)}, "grant_expired"),
        ({"params": {**PARAMS, "amount": 120.5}}, "params_not_canonical"),
    ):
        args: dict[str, Any] = {"action": "payment", "params": PARAMS,
                                "resource": "payee:acme-gmbh", "now": NOW, **kw}
        with pytest.raises(GrantInvalid) as bad:
            verify_offline(token, _keys(), **args)
        assert bad.value.code == code


def test_malformed_published_keys() -> None:
    for doc in ({}, {"keys": "x"}, {"keys": {"k": "not base64!"}}, {"keys": {"k": "AAAA"}}):
        with pytest.raises(GrantInvalid) as bad:
            parse_published_keys(doc)
        assert bad.value.code == "grant_keys_invalid"


# -- server nonces (RFC 9449 section 8) ---------------------------------------------------------

_ASK = 'DPoP error="use_dpop_nonce", algs="ES256"'


class _NonceProver:
    """A proof hook that keeps nonces (the shape of ``SessionProver``): the proof is the
    nonce it carried, so the test reads what was sent."""

    def __init__(self) -> None:
        self.nonce: str | None = None

    def __call__(self, method: str, url: str, body: bytes) -> str:
        return f"proof;nonce={self.nonce}"


def _nonce_answer(status: int, nonce: str | None, challenge: str | None = None) -> Answer:
    headers = {k: v for k, v in (("dpop-nonce", nonce), ("www-authenticate", challenge))
               if v is not None}
    body = json.dumps({"error": {"code": "use_dpop_nonce", "message": "m"}}).encode()
    return Answer(status, headers, body if status >= 400 else b"{}")


def test_nonce_kept_and_sent_in_the_next_proof() -> None:
    prover = _NonceProver()
    s = Session("http://svc", "k", timeout=5, retry=RetryPolicy(), proof=prover)
    p = s.prepare(Call("POST", "/v1/actions", body={}))
    assert p.headers["DPoP"] == "proof;nonce=None" and p.proved and p.nonce is None
    assert not s.renew_nonce(p, _nonce_answer(200, "n1"))  # a success: kept, no resend
    p2 = s.prepare(Call("POST", "/v1/actions", body={}))
    assert p2.headers["DPoP"] == "proof;nonce=n1" and p2.nonce == "n1"


def test_use_dpop_nonce_resends_only_with_a_new_nonce() -> None:
    prover = _NonceProver()
    s = Session("http://svc", "k", timeout=5, retry=RetryPolicy(), proof=prover)
    p = s.prepare(Call("POST", "/v1/actions", body={}))
    assert s.renew_nonce(p, _nonce_answer(401, "n1", _ASK))
    again = s.prepare(Call("POST", "/v1/actions", body={}))
    assert again.headers["DPoP"] == "proof;nonce=n1"
    # The same nonce again: resending cannot help, the refusal is the answer.
    assert not s.renew_nonce(again, _nonce_answer(401, "n1", _ASK))
    # Other refusals carrying a nonce (a forged one: dpop_nonce_invalid) are not resent.
    assert not s.renew_nonce(again, _nonce_answer(401, "n2", 'DPoP error="invalid_dpop_proof"'))
    assert prover.nonce == "n2"  # but the nonce is kept for the next proof
    # A request sent without a proof is never resent; nor is a challenge of another scheme.
    bare = Session("http://svc", None, timeout=5, retry=RetryPolicy(), proof=prover)
    unproved = bare.prepare(Call("GET", "/v1/health", auth=False))
    assert not unproved.proved
    assert not bare.renew_nonce(unproved, _nonce_answer(401, "n3", _ASK))
    assert not s.renew_nonce(again, _nonce_answer(401, "n4", 'Bearer error="use_dpop_nonce"'))


def test_a_proof_hook_without_nonces_is_left_alone() -> None:
    s = Session("http://svc", "k", timeout=5, retry=RetryPolicy(),
                proof=lambda m, u, b: "proof")
    p = s.prepare(Call("POST", "/v1/actions", body={}))
    assert p.proved and not s.renew_nonce(p, _nonce_answer(401, "n1", _ASK))


def test_transport_resends_once_then_raises() -> None:
    from sandboxsec_client import AgentClient

    seen: list[str | None] = []
    count = iter(range(100))

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("DPoP"))
        # A service that asks for a new nonce every time: one resend, then the refusal.
        return httpx.Response(401, headers={"DPoP-Nonce": f"n{next(count)}",
                                            "WWW-Authenticate": _ASK},
                              json={"error": {"code": "use_dpop_nonce", "message": "m"}})

    prover = _NonceProver()
    with AgentClient("http://svc", "k", proof=prover,
                     http=httpx.Client(transport=httpx.MockTransport(handler))) as agent:
        with pytest.raises(Exception) as refused:
            agent.ask("sid", "message", "app:chat", {})
    assert getattr(refused.value, "code", None) == "use_dpop_nonce"
    assert seen == ["proof;nonce=None", "proof;nonce=n0"]
