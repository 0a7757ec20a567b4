"""The pure WebAuthn checks: each wrong assertion gets its own reason, in order."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest

from sandboxsec.errors import SandboxSecError
from sandboxsec.people.passkeys import (
    DECISION_DOMAIN,
    authentication_options,
    decision_challenge,
    decision_preimage,
    parse_assertion,
    registration_options,
    verify_assertion,
    verify_registration,
)
from sandboxsec.sandbox.passkey import UP, UV, SoftPasskey

ORIGIN = "https://approve.bank.example"
RP = "bank.example"


def _registered() -> tuple[SoftPasskey, Any, bytes]:
    pk = SoftPasskey(rp_id=RP, origin=ORIGIN)
    challenge = b"r" * 32
    opts = {"publicKey": registration_options(
        rp_id=RP, rp_name="Bank", user_handle=b"u" * 32, handle="alice",
        display_name="Alice", challenge=challenge, exclude=[], timeout_ms=60000)}
    reg = verify_registration(pk.create(opts), challenge=challenge, rp_id=RP,
                              origins=[ORIGIN])
    return pk, reg, challenge


def test_decision_challenge_is_domain_separated_and_binds_every_field() -> None:
    exp = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    base: dict[str, Any] = {"tenant_id": "tn_1", "approval_id": "apr_1", "params_hmac": "a" * 64,
                            "decision": "approve", "person_id": "per_1", "expires_at": exp,
                            "nonce": b"n" * 32}
    pre = decision_preimage(**base)
    assert decision_challenge(pre) == hashlib.sha256(DECISION_DOMAIN + pre).digest()
    assert pre == (b'{"approval_id":"apr_1","decision":"approve","exp":"2026-12-01T12:00:00Z",'
                   b'"nonce":"bm5ubm5ubm5ubm5ubm5ubm5ubm5ubm5ubm5ubm5ubm4","params_hmac":"'
                   + b"a" * 64 + b'","person_id":"per_1","tenant_id":"tn_1","v":1}')
    seen = {decision_challenge(pre)}
    for name, other in [("tenant_id", "tn_2"), ("approval_id", "apr_2"),
                        ("params_hmac", "b" * 64), ("decision", "deny"),
                        ("person_id", "per_2"), ("expires_at", exp.replace(minute=1)),
                        ("nonce", b"m" * 32)]:
        seen.add(decision_challenge(decision_preimage(**{**base, name: other})))
    assert len(seen) == 8


def test_options_require_user_verification_and_resident_keys() -> None:
    opts = registration_options(rp_id=RP, rp_name="Bank", user_handle=b"u" * 32,
                                handle="alice", display_name="Alice", challenge=b"c" * 32,
                                exclude=[b"x"], timeout_ms=1000)
    sel = opts["authenticatorSelection"]
    assert sel["userVerification"] == "required" and sel["residentKey"] == "required"
    assert opts["attestation"] == "none" and opts["excludeCredentials"][0]["id"] == "eA"
    get = authentication_options(rp_id=RP, challenge=b"c" * 32, allow=[], timeout_ms=1000)
    assert get["userVerification"] == "required" and get["rpId"] == RP


@pytest.mark.parametrize(("code", "kwargs"), [
    ("assertion_challenge_mismatch", {"challenge": b"o" * 32}),
    ("assertion_origin_mismatch", {"origin": "https://evil.example"}),
    ("assertion_cross_origin", {"extra": {"crossOrigin": True}}),
    ("assertion_cross_origin", {"extra": {"topOrigin": "https://evil.example"}}),
    ("assertion_rp_mismatch", {"rp_id": "evil.example"}),
    ("assertion_user_not_verified", {"flags": UP}),
    ("assertion_user_not_verified", {"flags": UV}),
    ("assertion_signature_invalid", {"bad_signature": True}),
])
def test_each_wrong_assertion_has_its_reason(code: str, kwargs: dict[str, Any]) -> None:
    pk, reg, _ = _registered()
    challenge = b"d" * 32
    options = {"publicKey": authentication_options(rp_id=RP, challenge=challenge, allow=[],
                                                   timeout_ms=1000)}
    assertion = parse_assertion(pk.get(options, **kwargs))
    with pytest.raises(SandboxSecError) as err:
        verify_assertion(assertion, challenge=challenge, rp_id=RP, origins=[ORIGIN],
                         public_key=reg.public_key, stored_sign_count=0,
                         user_handle=b"u" * 32, backup_eligible=False)
    assert err.value.reason == code


def test_good_assertion_counter_handle_and_flags() -> None:
    pk, reg, _ = _registered()
    challenge = b"d" * 32
    options = {"publicKey": authentication_options(rp_id=RP, challenge=challenge, allow=[],
                                                   timeout_ms=1000)}
    good = parse_assertion(pk.get(options))
    ok = verify_assertion(good, challenge=challenge, rp_id=RP, origins=[ORIGIN],
                          public_key=reg.public_key, stored_sign_count=0,
                          user_handle=b"u" * 32, backup_eligible=False)
    assert ok.sign_count == 1 and ok.user_verified
    checks: dict[str, Any] = {"challenge": challenge, "rp_id": RP, "origins": [ORIGIN],
                              "public_key": reg.public_key}
    for code, extra in [("assertion_counter_regressed", {"stored_sign_count": 1}),
                        ("assertion_flags_mismatch", {"user_handle": b"v" * 32}),
                        ("assertion_flags_mismatch", {"backup_eligible": True})]:
        args = {"stored_sign_count": 0, "user_handle": b"u" * 32, "backup_eligible": False,
                **extra}
        with pytest.raises(SandboxSecError) as err:
            verify_assertion(good, **checks, **args)
        assert err.value.reason == code


@pytest.mark.parametrize("broken", [
    None, [], {"type": "public-key"}, {"type": "public-key", "rawId": "!!", "response": {}},
    {"type": "other", "rawId": "AA", "response": {}},
    {"type": "public-key", "id": "AA", "rawId": "AQ", "response": {}},
    # One spelling per value: padding, non-zero unused bits, standard-alphabet characters.
    {"type": "public-key", "rawId": "AA==", "response": {}},
    {"type": "public-key", "rawId": "AB", "response": {}},
    {"type": "public-key", "id": "AB", "rawId": "AA", "response": {}},
    {"type": "public-key", "rawId": "A+/A", "response": {}},
])
def test_malformed_assertions(broken: Any) -> None:
    with pytest.raises(SandboxSecError) as err:
        parse_assertion(broken)
    assert err.value.reason == "assertion_malformed"


def test_registration_refusals() -> None:
    pk = SoftPasskey(rp_id=RP, origin=ORIGIN)
    challenge = b"r" * 32
    opts = {"publicKey": registration_options(
        rp_id=RP, rp_name="Bank", user_handle=b"u" * 32, handle="alice",
        display_name="Alice", challenge=challenge, exclude=[], timeout_ms=60000)}
    for kwargs in ({"flags": UP}, {"origin": "https://evil.example"},
                   {"extra": {"crossOrigin": True}}):
        with pytest.raises(SandboxSecError) as err:
            verify_registration(pk.create(opts, **kwargs), challenge=challenge, rp_id=RP,
                                origins=[ORIGIN])
        assert err.value.reason == "registration_invalid"
    with pytest.raises(SandboxSecError):
        verify_registration(pk.create(opts), challenge=b"x" * 32, rp_id=RP, origins=[ORIGIN])
