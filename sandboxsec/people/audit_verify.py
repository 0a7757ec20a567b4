"""Offline re-verification of passkey-signed decisions in an audit export (pure).

Runs after :func:`sandboxsec.audit.verify.verify_export` has shown the entries are the ones
the service signed.  It then shows something the log's signature alone cannot: that each
recorded decision was made by the registered passkey of the person it names, over a challenge
committing to exactly this request, its params_hash and this decision.  A service (or anyone
holding the audit signing key) cannot forge that without the person's authenticator.

For every ``people:credential:register`` entry it keeps the COSE public key, RP id, allowed
origins and user handle; for every decision or vote entry signed with a passkey it:

1. parses the recorded assertion bytes and challenge preimage;
2. checks the preimage names this entry's tenant, approval id, params_hmac, decision and person;
3. recomputes the challenge (``SHA-256("sandboxsec/approval/v1\\0" || preimage)``);
4. finds the credential's registration (earlier in the export), that it is the person's and
   that no ``people:credential:revoke`` entry before this one revoked it;
5. verifies the assertion against it: challenge, origin, frames, rpIdHash, UP and UV flags,
   user handle and signature (the sign counter belongs to the online check).

An export that starts after the registration of a credential cannot anchor that credential's
decisions: they are counted as ``unanchored`` rather than verified (export from entry 0 to
verify every decision).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.encoding import b64decode_strict
from sandboxsec.errors import SandboxSecError
from sandboxsec.people.passkeys import Assertion, decision_challenge, verify_assertion

__all__ = ["AuditDecisionInvalidError", "DecisionReport", "verify_decisions"]

_REGISTER = b'"event":"people:credential:register"'
_REVOKE = b'"event":"people:credential:revoke"'
_DECISION_EVENTS = {
    "approval:request:approve": "approve",
    "approval:request:deny": "deny",
    "approval:request:vote": None,  # the vote's own decision field says which
}
_PASSKEY = b'"signer":"passkey"'


class AuditDecisionInvalidError(AuditVerificationError):
    """A recorded passkey decision does not verify against its registered passkey."""

    code = "audit_decision_invalid"


@dataclass(frozen=True, slots=True)
class DecisionReport:
    """What the decision check established."""

    registrations: int
    decisions_verified: int
    unanchored: int


@dataclass(frozen=True, slots=True)
class _Registered:
    person_id: str
    tenant_id: str
    public_key: bytes
    rp_id: str
    origins: tuple[str, ...]
    user_handle: bytes
    revoked_seq: int | None = None


def _b64(value: Any, what: str, seq: int) -> bytes:
    try:
        return b64decode_strict(value)
    except (ValueError, TypeError) as exc:
        raise AuditDecisionInvalidError(f"entry {seq}: {what} is not base64", seq=seq) from exc


def verify_decisions(data: bytes, *, first_seq: int = 0) -> DecisionReport:
    """Re-verify every passkey-signed decision of an (already verified) export."""
    credentials: dict[bytes, _Registered] = {}
    verified = unanchored = 0
    for line in data.split(b"\n"):
        if not line.startswith(b'{"v":'):
            continue
        if _REGISTER in line:
            entry = json.loads(line)
            seq = int(entry["seq"])
            body = entry.get("body", {})
            credentials[_b64(body.get("credential_id"), "credential_id", seq)] = _Registered(
                person_id=str(entry.get("object_ids", {}).get("person_id")),
                tenant_id=str(entry.get("tenant")),
                public_key=_b64(body.get("public_key_cose"), "public_key_cose", seq),
                rp_id=str(body.get("rp_id")),
                origins=tuple(str(o) for o in body.get("origins", [])),
                user_handle=_b64(body.get("user_handle"), "user_handle", seq))
            continue
        if _REVOKE in line:
            entry = json.loads(line)
            seq = int(entry["seq"])
            raw = _b64(entry.get("body", {}).get("credential_id"), "credential_id", seq)
            if raw in credentials:
                credentials[raw] = replace(credentials[raw], revoked_seq=seq)
            continue
        if _PASSKEY not in line or b'"event":"approval:request:' not in line:
            continue
        entry = json.loads(line)
        if entry.get("event") not in _DECISION_EVENTS:
            continue
        if _check(entry, credentials, first_seq):
            verified += 1
        else:
            unanchored += 1
    return DecisionReport(len(credentials), verified, unanchored)


def _check(entry: dict[str, Any], credentials: dict[bytes, _Registered], first_seq: int
           ) -> bool:
    seq = int(entry["seq"])
    body = entry.get("body", {})
    if body.get("signer") != "passkey":
        return True
    # 1. the recorded bytes
    wa = body.get("webauthn")
    if not isinstance(wa, dict) or not isinstance(body.get("challenge_preimage"), str):
        raise AuditDecisionInvalidError(f"entry {seq} records no assertion", seq=seq)
    handle = wa.get("user_handle")
    assertion = Assertion(
        credential_id=_b64(wa.get("credential_id"), "credential_id", seq),
        client_data_json=_b64(wa.get("client_data_json"), "client_data_json", seq),
        authenticator_data=_b64(wa.get("authenticator_data"), "authenticator_data", seq),
        signature=_b64(wa.get("signature"), "signature", seq),
        user_handle=None if handle is None else _b64(handle, "user_handle", seq))
    preimage_text: str = body["challenge_preimage"]
    # 2. the preimage commits to this entry's request, params, decision and person
    try:
        pre = json.loads(preimage_text)
    except ValueError as exc:
        raise AuditDecisionInvalidError(f"entry {seq}: the challenge preimage is not JSON",
                                        seq=seq) from exc
    decision = _DECISION_EVENTS[entry["event"]] or body.get("decision")
    person = (entry.get("actor") or {}).get("key_id")
    expected = {"tenant_id": entry.get("tenant"),
                "approval_id": (entry.get("object_ids") or {}).get("approval_id"),
                "params_hmac": body.get("params_hmac"), "decision": decision,
                "person_id": person}
    for name, want in expected.items():
        if not isinstance(pre, dict) or pre.get(name) != want or want is None:
            raise AuditDecisionInvalidError(
                f"entry {seq}: the signed challenge is for another {name.replace('_', ' ')}",
                seq=seq)
    # 3. the challenge
    challenge = decision_challenge(preimage_text.encode("utf-8"))
    # 4. the registration
    reg = credentials.get(assertion.credential_id)
    if reg is None:
        if first_seq > 0:
            return False
        raise AuditDecisionInvalidError(
            f"entry {seq}: the passkey that signed it was never registered", seq=seq)
    if reg.person_id != person or reg.tenant_id != entry.get("tenant"):
        raise AuditDecisionInvalidError(
            f"entry {seq}: the passkey is registered to another person", seq=seq)
    if reg.revoked_seq is not None:
        raise AuditDecisionInvalidError(
            f"entry {seq}: signed by a passkey revoked at entry {reg.revoked_seq}", seq=seq)
    # 5. the assertion itself
    try:
        verify_assertion(assertion, challenge=challenge, rp_id=reg.rp_id, origins=reg.origins,
                         public_key=reg.public_key, stored_sign_count=0,
                         user_handle=reg.user_handle, backup_eligible=None)
    except SandboxSecError as exc:
        raise AuditDecisionInvalidError(
            f"entry {seq}: the recorded assertion does not verify ({exc.reason})", seq=seq
        ) from exc
    return True
