"""Every operation of every role, written once as a flow (see :mod:`._core`).

A flow yields the calls it needs and returns the typed result; it does no I/O itself, except
through the TPM the caller hands in (which is the sandbox's own hardware, not the network).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from sandboxsec_client._core import Answer, Call, Flow, LongPoll, expect_json, parse_error
from sandboxsec_client.errors import ParamsHashMismatchError
from sandboxsec_client.grants import params_hash
from sandboxsec_client.models import (
    ApiKey,
    ApiKeyCreated,
    Approval,
    AuditKey,
    Checkpoint,
    Decision,
    GrantCheck,
    KeyStatus,
    Policy,
    PolicyCheck,
    RecordCreated,
    SessionInfo,
    TrajectoryRecord,
    Verdict,
    WhoAmI,
)
from sandboxsec_client.proofs import session_key_jwk

__all__ = ["Attester", "AttesterSigner", "SessionKeyAttester"]


class Attester(Protocol):
    """The sandbox's TPM as the agent client needs it."""

    def ak(self) -> bytes:
        """The AK's marshalled ``TPM2B_PUBLIC`` (created on first use)."""
        ...

    def ek_certificate(self) -> bytes:
        """The EK certificate, DER."""
        ...

    def ek_public(self) -> bytes | None:
        """The EK's marshalled ``TPM2B_PUBLIC`` (``None``: the service reads the EK's key
        from its certificate)."""
        ...

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the EK and the AK."""
        ...

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE) over the quoted PCRs with ``nonce``."""
        ...

    def read_pcrs(self) -> dict[int, bytes]:
        """The quoted SHA-256 PCR values by index."""
        ...

    def event_log(self) -> bytes | None:
        """The TCG event log of the boot, if the platform keeps one."""
        ...


@runtime_checkable
class SessionKeyAttester(Attester, Protocol):
    """A TPM that also holds a session key: attestation then certifies it, and the token
    binds the session to it (``cnf.jkt``); every session call carries a ``DPoP`` proof."""

    def new_session_key(self) -> bytes:
        """A fresh TPM-held session key; its marshalled ``TPM2B_PUBLIC``."""
        ...

    def certify_session_key(self, nonce: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of the session key by the AK over ``nonce``."""
        ...

    def sign_session(self, message: bytes) -> bytes:
        """ES256 by the session key over SHA-256(``message``): raw ``r || s``."""
        ...


class AttesterSigner:
    """The session key of a :class:`SessionKeyAttester` as a
    :class:`~sandboxsec_client.proofs.SessionKeySigner` (its public key from the
    ``TPM2B_PUBLIC`` the TPM returned)."""

    def __init__(self, tpm: SessionKeyAttester, public: bytes) -> None:
        self._tpm = tpm
        self._jwk = session_key_jwk(public)

    @property
    def jwk(self) -> Mapping[str, str]:
        """The session key's public JWK."""
        return dict(self._jwk)

    def sign(self, message: bytes) -> bytes:
        """Signed by the TPM."""
        return self._tpm.sign_session(message)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _seg(value: str) -> str:
    # Ids go into the path: never let one add segments or a query.
    return quote(value, safe="")


def _json(call: Call) -> Flow[Any]:
    answer = yield call
    return expect_json(answer)


# -- agent ------------------------------------------------------------------------------------

def bind_ak(tpm: Attester) -> Flow[str]:
    body = {"ak_public": _b64(tpm.ak()), "ek_certificate": _b64(tpm.ek_certificate())}
    ek_public = tpm.ek_public()
    if ek_public is not None:
        body["ek_public"] = _b64(ek_public)
    challenge = yield from _json(Call("POST", "/v1/attestation/ak/challenge", body))
    # Only the TPM holding the certified EK, with exactly this AK loaded, can do this.
    secret = tpm.activate(base64.b64decode(challenge["credential_blob"]),
                          base64.b64decode(challenge["encrypted_secret"]))
    out = yield from _json(Call("POST", "/v1/attestation/ak/activate", {
        "credential_id": challenge["credential_id"], "secret": _b64(secret)}))
    return str(out["ak_name"])


def attest(tpm: Attester, manifest: bytes) -> Flow[tuple[Verdict, bytes | None]]:
    """The verdict, and the ``TPM2B_PUBLIC`` of the session key it certified (if any)."""
    challenge = yield from _json(Call("POST", "/v1/attestation/challenge", {}))
    nonce = base64.b64decode(challenge["nonce"])
    quote_, signature = tpm.quote(nonce)
    body: dict[str, Any] = {
        "nonce": _b64(nonce), "quote": _b64(quote_), "signature": _b64(signature),
        "ak_public": _b64(tpm.ak()), "ek_certificate": _b64(tpm.ek_certificate()),
        "pcrs": {"sha256": {str(i): v.hex() for i, v in tpm.read_pcrs().items()}},
        "image_manifest": manifest.decode("utf-8"),
    }
    session_key: bytes | None = None
    if isinstance(tpm, SessionKeyAttester):
        # A fresh session key, certified by the AK over the same nonce.
        session_key = tpm.new_session_key()
        certify, certify_sig = tpm.certify_session_key(nonce)
        body.update(session_key=_b64(session_key), session_key_certify=_b64(certify),
                    session_key_signature=_b64(certify_sig))
    log = tpm.event_log()
    if log is not None:
        body["event_log"] = _b64(log)
    # The nonce is single use: a lost answer cannot be repeated, only re-attested.
    verdict = Verdict.from_json((yield from _json(Call("POST", "/v1/attestation/verify",
                                                       body))))
    return verdict, session_key


def start_session(attestation_token: str) -> Flow[SessionInfo]:
    return SessionInfo.from_json((yield from _json(Call(
        "POST", "/v1/sessions", {"attestation_token": attestation_token}))))


def get_session(session_id: str) -> Flow[SessionInfo]:
    return SessionInfo.from_json((yield from _json(Call(
        "GET", f"/v1/sessions/{_seg(session_id)}"))))


def record(session_id: str, kind: str, data: bytes,
           meta: Mapping[str, Any] | None) -> Flow[RecordCreated]:
    return RecordCreated.from_json((yield from _json(Call(
        "POST", f"/v1/sessions/{_seg(session_id)}/trajectory",
        {"kind": kind, "data": _b64(data), "meta": dict(meta or {})}))))


def ask(session_id: str, action: str, resource: str,
        params: Mapping[str, Any]) -> Flow[Decision]:
    return Decision.from_json((yield from _json(Call("POST", "/v1/actions", {
        "session_id": session_id, "action": action, "resource": resource,
        "params": dict(params)}))))


def approval(approval_id: str) -> Flow[Approval]:
    return Approval.from_json((yield from _json(Call(
        "GET", f"/v1/approvals/{_seg(approval_id)}"))))


def wait(approval_id: str, timeout: float, poll: float) -> Flow[Approval]:
    """Long-poll until the request leaves ``pending`` or ``timeout`` seconds have passed;
    a dropped connection is reconnected (the wait is a read: repeating it is harmless)."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        a = Approval.from_json((yield from _json(Call(
            "GET", f"/v1/approvals/{_seg(approval_id)}/wait",
            long_poll=LongPoll(deadline=deadline, step=poll)))))
        if not a.pending or time.monotonic() >= deadline:
            return a


# -- downstream -------------------------------------------------------------------------------

def verify_grant(grant: str, action: str, params: Mapping[str, Any],
                 resource: str | None) -> Flow[GrantCheck]:
    body: dict[str, Any] = {"grant": grant, "action": action, "params": dict(params)}
    if resource is not None:
        body["resource"] = resource
    answer: Answer = yield Call("POST", "/v1/grants/verify", body, refusal_ok=True)
    if answer.ok:
        out = answer.json()
        return GrantCheck(valid=True, grant_id=out["grant_id"], raw=out)
    err = parse_error(answer)
    return GrantCheck(valid=False, code=err.code, message=err.message)


def grant_keys() -> Flow[dict[str, Any]]:
    out = yield from _json(Call("GET", "/v1/grants/jwks", auth=False))
    return dict(out)


# -- approver ---------------------------------------------------------------------------------

def list_approvals(state: str | None, session_id: str | None,
                   limit: int) -> Flow[list[Approval]]:
    params = {"limit": str(limit)}
    if state is not None:
        params["state"] = state
    if session_id is not None:
        params["session_id"] = session_id
    out = yield from _json(Call("GET", "/v1/approvals", params=params))
    return [Approval.from_json(a) for a in out]


def decide(request: Approval | str, verb: str, shown_hash: str | None) -> Flow[Approval]:
    """Approve or deny.  Given an :class:`Approval`, the params shown are re-hashed here and
    the decision refused locally when they do not match the hash the service sent."""
    if isinstance(request, Approval):
        recomputed = params_hash(request.params)
        if recomputed != request.params_hash:
            raise ParamsHashMismatchError(
                f"approval {request.id}: the params shown hash to {recomputed[:12]}..., "
                f"the service says {request.params_hash[:12]}...; not deciding")
        approval_id, shown_hash = request.id, recomputed
    else:
        approval_id = request
        if shown_hash is None:
            raise ValueError("deciding by id needs the params_hash that was shown")
    # Deciding twice is refused by the service (approval_not_pending), so a repeat is safe.
    return Approval.from_json((yield from _json(Call(
        "POST", f"/v1/approvals/{_seg(approval_id)}/{verb}", {"params_hash": shown_hash},
        idempotent=True))))


# -- auditor ----------------------------------------------------------------------------------

def checkpoint() -> Flow[Checkpoint]:
    return Checkpoint.from_json((yield from _json(Call("GET", "/v1/audit/checkpoint"))))


def audit_key() -> Flow[AuditKey]:
    return AuditKey.from_json((yield from _json(Call("GET", "/v1/audit/keys"))))


def export(start: int, end: int | None, since: int | None) -> Flow[bytes]:
    params = {"from": str(start)}
    if end is not None:
        params["to"] = str(end)
    if since is not None:
        params["since"] = str(since)
    answer: Answer = yield Call("GET", "/v1/audit/export", params=params, timeout=300.0)
    if not answer.ok:
        raise parse_error(answer)
    return answer.content


def inclusion_proof(seq: int, size: int | None) -> Flow[dict[str, Any]]:
    params = {"seq": str(seq)}
    if size is not None:
        params["size"] = str(size)
    return dict((yield from _json(Call("GET", "/v1/audit/proof", params=params))))


def consistency_proof(first: int, second: int) -> Flow[dict[str, Any]]:
    return dict((yield from _json(Call("GET", "/v1/audit/consistency",
                                       params={"first": str(first), "second": str(second)}))))


# -- admin ------------------------------------------------------------------------------------

def whoami() -> Flow[WhoAmI]:
    return WhoAmI.from_json((yield from _json(Call("GET", "/v1/tenant"))))


def list_api_keys() -> Flow[list[ApiKey]]:
    return [ApiKey.from_json(k) for k in (yield from _json(Call("GET", "/v1/api-keys")))]


def create_api_key(role: str, label: str) -> Flow[ApiKeyCreated]:
    out = yield from _json(Call("POST", "/v1/api-keys", {"role": role, "label": label}))
    return ApiKeyCreated(key_id=out["key_id"], role=out["role"], key=out["key"])


def revoke_api_key(key_id: str) -> Flow[None]:
    answer: Answer = yield Call("DELETE", f"/v1/api-keys/{_seg(key_id)}")
    if not answer.ok:
        raise parse_error(answer)
    return None


def key_status() -> Flow[KeyStatus]:
    return KeyStatus.from_json((yield from _json(Call("GET", "/v1/keys"))))


def rotate_keys(rewrap: bool) -> Flow[KeyStatus]:
    return KeyStatus.from_json((yield from _json(Call("POST", "/v1/keys/rotate",
                                                      {"rewrap": rewrap}))))


def rewrap_keys() -> Flow[dict[str, Any]]:
    return dict((yield from _json(Call("POST", "/v1/keys/rewrap", {}, idempotent=True))))


def retire_keys(min_decryption_version: int) -> Flow[KeyStatus]:
    return KeyStatus.from_json((yield from _json(Call(
        "POST", "/v1/keys/retire", {"min_decryption_version": min_decryption_version},
        idempotent=True))))


def get_policy() -> Flow[Policy]:
    return Policy.from_json((yield from _json(Call("GET", "/v1/policy"))))


def put_policy(text: str, base_version: int | None) -> Flow[Policy]:
    return Policy.from_json((yield from _json(Call(
        "PUT", "/v1/policy", {"text": text, "base_version": base_version},
        # Only idempotent with a base version: a repeat then conflicts instead of re-applying.
        idempotent=base_version is not None))))


def validate_policy(text: str) -> Flow[PolicyCheck]:
    answer: Answer = yield Call("POST", "/v1/policy/validate", {"text": text},
                                idempotent=True, refusal_ok=True)
    if answer.ok:
        out = answer.json()
        return PolicyCheck(valid=bool(out["valid"]), rule_count=int(out["rule_count"]),
                           raw=out)
    # A policy the service would refuse is the answer asked for, with its reason.
    err = parse_error(answer)
    if err.status != 400:
        raise err
    return PolicyCheck(valid=False, rule_count=0, code=err.code, message=err.message)


def _record(r: dict[str, Any]) -> TrajectoryRecord:
    return TrajectoryRecord(record_id=r["record_id"], session_id=r["session_id"],
                            kind=r["kind"], data=base64.b64decode(r["data"]),
                            meta=dict(r["meta"]), created_at=r["created_at"], raw=r)


def read_record(session_id: str, record_id: str) -> Flow[TrajectoryRecord]:
    return _record((yield from _json(Call(
        "GET", f"/v1/sessions/{_seg(session_id)}/trajectory/{_seg(record_id)}"))))


def list_records(session_id: str, limit: int, after: str | None,
                 kind: str | None) -> Flow[tuple[list[TrajectoryRecord], str | None]]:
    params = {"limit": str(limit)}
    if after is not None:
        params["after"] = after
    if kind is not None:
        params["kind"] = kind
    out = yield from _json(Call("GET", f"/v1/sessions/{_seg(session_id)}/trajectory",
                                params=params))
    return [_record(r) for r in out["records"]], out.get("next_after")
