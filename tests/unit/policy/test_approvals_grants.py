"""The approval state machine and grant tokens (pure)."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from sandboxsec.policy.approvals import (
    ApprovalEvent,
    ApprovalState,
    check_decision,
    effective_state,
    transition,
)
from sandboxsec.policy.canonical import params_hash
from sandboxsec.policy.errors import (
    ApprovalExpiredError,
    ApprovalHashMismatchError,
    ApprovalNotPendingError,
    GrantActionMismatchError,
    GrantExpiredError,
    GrantMalformedError,
    GrantParamsMismatchError,
    GrantResourceMismatchError,
    GrantSignatureInvalidError,
)
from sandboxsec.policy.grants import GrantClaims, check_grant, decode_grant, encode_grant, key_id

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
H = "a" * 64


def test_legal_transitions() -> None:
    assert transition(ApprovalState.PENDING, ApprovalEvent.APPROVE, expires_at=LATER,
                      now=NOW) is ApprovalState.APPROVED
    assert transition(ApprovalState.PENDING, ApprovalEvent.DENY, expires_at=LATER,
                      now=NOW) is ApprovalState.DENIED
    assert transition(ApprovalState.APPROVED, ApprovalEvent.CONSUME, expires_at=LATER,
                      now=NOW) is ApprovalState.CONSUMED
    assert transition(ApprovalState.PENDING, ApprovalEvent.EXPIRE, expires_at=NOW,
                      now=NOW) is ApprovalState.EXPIRED


@pytest.mark.parametrize("state", [ApprovalState.APPROVED, ApprovalState.DENIED,
                                   ApprovalState.CONSUMED])
@pytest.mark.parametrize("event", [ApprovalEvent.APPROVE, ApprovalEvent.DENY])
def test_decided_requests_cannot_be_decided_again(state: ApprovalState,
                                                  event: ApprovalEvent) -> None:
    with pytest.raises(ApprovalNotPendingError):
        transition(state, event, expires_at=LATER, now=NOW)


def test_expiry_is_effective_before_it_is_written() -> None:
    assert effective_state(ApprovalState.PENDING, NOW, NOW) is ApprovalState.EXPIRED
    assert effective_state(ApprovalState.APPROVED, NOW, NOW) is ApprovalState.APPROVED
    with pytest.raises(ApprovalExpiredError):
        transition(ApprovalState.PENDING, ApprovalEvent.APPROVE, expires_at=NOW, now=NOW)
    with pytest.raises(ApprovalExpiredError):
        transition(ApprovalState.EXPIRED, ApprovalEvent.APPROVE, expires_at=NOW, now=NOW)


@given(st.sampled_from(ApprovalState), st.sampled_from(ApprovalEvent), st.booleans())
def test_only_the_four_transitions_exist(state: ApprovalState, event: ApprovalEvent,
                                         expired: bool) -> None:
    expires = NOW if expired else LATER
    try:
        new = transition(state, event, expires_at=expires, now=NOW)
    except (ApprovalNotPendingError, ApprovalExpiredError):
        return
    assert (state, new) in {
        (ApprovalState.PENDING, ApprovalState.APPROVED),
        (ApprovalState.PENDING, ApprovalState.DENIED),
        (ApprovalState.PENDING, ApprovalState.EXPIRED),
        (ApprovalState.APPROVED, ApprovalState.CONSUMED),
    }


def test_approver_must_send_the_hash_they_were_shown() -> None:
    with pytest.raises(ApprovalHashMismatchError):
        check_decision(state=ApprovalState.PENDING, event=ApprovalEvent.APPROVE,
                       expires_at=LATER, now=NOW, shown_params_hash="b" * 64, params_hash=H)
    assert check_decision(state=ApprovalState.PENDING, event=ApprovalEvent.APPROVE,
                          expires_at=LATER, now=NOW, shown_params_hash=H,
                          params_hash=H) is ApprovalState.APPROVED


# ---------------------------------------------------------------- grants

KEY = Ed25519PrivateKey.generate()
PARAMS = {"amount": "125.50", "currency": "EUR"}
CLAIMS = GrantClaims(
    grant_id="gr_1", tenant_id="tn_a", session_id="ses_1", action="payment",
    resource="payee:acme", params_hash=params_hash(PARAMS), approval_id="apr_1",
    issued_at=NOW, expires_at=LATER, key_id=key_id(KEY.public_key()),
)
KEYS = {CLAIMS.key_id: KEY.public_key()}


def test_grant_roundtrip_and_determinism() -> None:
    token = encode_grant(CLAIMS, KEY)
    assert token == encode_grant(CLAIMS, KEY)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "kid": CLAIMS.key_id, "typ": "sandboxsec-grant+jws"}
    assert decode_grant(token, KEYS) == CLAIMS
    check_grant(CLAIMS, now=NOW, action="payment", params_hash=params_hash(PARAMS),
                resource="payee:acme")


def test_grant_binding_checks() -> None:
    with pytest.raises(GrantExpiredError):
        check_grant(CLAIMS, now=LATER, action="payment", params_hash=CLAIMS.params_hash)
    with pytest.raises(GrantActionMismatchError):
        check_grant(CLAIMS, now=NOW, action="login", params_hash=CLAIMS.params_hash)
    changed = params_hash({**PARAMS, "amount": "125.51"})
    with pytest.raises(GrantParamsMismatchError):
        check_grant(CLAIMS, now=NOW, action="payment", params_hash=changed)
    with pytest.raises(GrantResourceMismatchError):
        check_grant(CLAIMS, now=NOW, action="payment", params_hash=CLAIMS.params_hash,
                    resource="payee:evil")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _legacy(payload: dict[str, object], key: Ed25519PrivateKey = KEY) -> str:
    from sandboxsec.policy.canonical import canonical_json

    signing_input = f"sgr1.{_b64(canonical_json(payload))}"
    return f"{signing_input}.{_b64(key.sign(signing_input.encode()))}"


def _v1(claims: GrantClaims = CLAIMS) -> dict[str, object]:
    body = {k: v for k, v in claims.payload().items() if k not in ("iss", "aud")}
    return {**body, "v": 1}


def test_tampered_payload_fails_signature() -> None:
    from sandboxsec.policy.canonical import canonical_json

    head, payload, sig = encode_grant(CLAIMS, KEY).split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    body["ph"] = "b" * 64
    with pytest.raises(GrantSignatureInvalidError):
        decode_grant(f"{head}.{_b64(canonical_json(body))}.{sig}", KEYS)
    legacy_sig = _legacy(_v1()).split(".")[2]
    with pytest.raises(GrantSignatureInvalidError):
        decode_grant(f"sgr1.{_b64(canonical_json({**_v1(), 'ph': 'b' * 64}))}.{legacy_sig}",
                     KEYS)


def test_legacy_sgr1_grants_still_decode() -> None:
    assert decode_grant(_legacy(_v1()), KEYS) == CLAIMS


def test_jws_grant_claims_are_pinned() -> None:
    """iss, aud, typ, v and the payload kid are checked; a token of another kind fails."""
    from sandboxsec import jose
    from sandboxsec.policy.canonical import canonical_json

    def signed(payload: dict[str, object], typ: str = "sandboxsec-grant+jws") -> str:
        return jose.sign_compact({"kid": CLAIMS.key_id, "typ": typ}, canonical_json(payload),
                                 KEY)

    good = CLAIMS.payload()
    assert decode_grant(signed(good), KEYS) == CLAIMS
    for bad in ({**good, "aud": "urn:sandboxsec:attestation"}, {**good, "iss": "urn:evil"},
                {**good, "v": 1}, {**good, "kid": "0" * 16}):
        with pytest.raises(GrantMalformedError):
            decode_grant(signed(bad), KEYS)
    with pytest.raises(GrantMalformedError):
        decode_grant(signed(good, typ="JWT"), KEYS)


def test_noncanonical_base64url_refused() -> None:
    head, payload, sig = encode_grant(CLAIMS, KEY).split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # A 64-byte signature leaves 4 unused bits in its last character: setting one keeps the
    # decoded bytes and must still be refused (one grant, one spelling).
    odd = sig[:-1] + alphabet[alphabet.index(sig[-1]) | 1]
    assert odd != sig
    for bad in (f"{head}.{payload}.{odd}", f"{head}.{payload}.{sig}=",
                f"{head}.{payload}.{sig[:5]}!{sig[5:]}"):
        with pytest.raises((GrantMalformedError, GrantSignatureInvalidError)):
            decode_grant(bad, KEYS)


def test_other_key_refused() -> None:
    other = Ed25519PrivateKey.generate()
    token = encode_grant(replace(CLAIMS, key_id=key_id(other.public_key())), other)
    with pytest.raises(GrantSignatureInvalidError):
        decode_grant(token, KEYS)


@pytest.mark.parametrize("token", [
    "", "sgr1", "sgr1.a", "sgr2.YQ.YQ", "sgr1.!!.YQ", "sgr1.YQ.YQ.YQ", "x" * 5000,
    "sgr1." + _b64(b"[]") + ".YQ", "sgr1." + _b64(b'{"v":1}') + ".YQ",
])
def test_malformed_tokens(token: str) -> None:
    with pytest.raises(GrantMalformedError):
        decode_grant(token, KEYS)


def test_non_canonical_payload_refused() -> None:
    from sandboxsec import jose

    payload = json.dumps(CLAIMS.payload(), indent=1).encode()
    token = jose.sign_compact({"kid": CLAIMS.key_id, "typ": "sandboxsec-grant+jws"}, payload,
                              KEY)
    with pytest.raises(GrantMalformedError):
        decode_grant(token, KEYS)
    legacy = json.dumps(_v1(), indent=1).encode()
    signing_input = f"sgr1.{_b64(legacy)}"
    token = f"{signing_input}.{_b64(KEY.sign(signing_input.encode()))}"
    with pytest.raises(GrantMalformedError):
        decode_grant(token, KEYS)


@given(st.binary(max_size=200), st.binary(max_size=80))
def test_random_tokens_never_verify(payload: bytes, sig: bytes) -> None:
    with pytest.raises((GrantMalformedError, GrantSignatureInvalidError)):
        decode_grant(f"sgr1.{_b64(payload)}.{_b64(sig)}", KEYS)
    head = _b64(json.dumps({"alg": "EdDSA", "kid": CLAIMS.key_id}).encode())
    with pytest.raises((GrantMalformedError, GrantSignatureInvalidError)):
        decode_grant(f"{head}.{_b64(payload)}.{_b64(sig)}", KEYS)
