"""A small HTTP client for an agent runtime: attest, start a session, record, ask, wait.

The client speaks the public API (``/v1``) with one API key and knows nothing of the
service's internals.  Every non-2xx answer becomes :class:`ApiError` carrying the service's
stable reason code, except where a refusal is itself the answer the caller asked for
(:meth:`AgentClient.verify_grant` returns ``valid=False`` with the code).

Typical use inside a sandbox::

    agent = AgentClient("https://sandboxsec.example", agent_key)
    agent.bind_ak(tpm)                      # once per tenant and AK
    verdict = agent.attest(tpm, manifest)   # challenge -> quote -> verify
    session = agent.start_session(verdict.token)
    agent.record(session.session_id, "action", b'{"click": [10, 20]}')
    decision = agent.request_action(session.session_id, "payment", "payee:acme", params)
    if decision.decision == "approval_required":
        approval = agent.wait(decision.approval_id, timeout=120)
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import httpx

from sandboxsec.clock import Clock, SystemClock
from sandboxsec.sessions import dpop

__all__ = [
    "AgentClient",
    "ApiClient",
    "ApiError",
    "Approval",
    "Attester",
    "Decision",
    "GrantCheck",
    "SessionInfo",
    "Verdict",
]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Attester(Protocol):
    """The sandbox's TPM as the client needs it (:class:`sandboxsec.sandbox.swtpm.SwTpm`)."""

    def ak(self) -> bytes:
        """The AK's marshalled ``TPM2B_PUBLIC`` (created on first use)."""
        ...

    def ek_certificate(self) -> bytes:
        """The EK certificate, DER."""
        ...

    def ek_public(self) -> bytes:
        """The EK's marshalled ``TPM2B_PUBLIC``."""
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

    def new_session_key(self) -> bytes:
        """Create a fresh TPM-held session key; its marshalled ``TPM2B_PUBLIC``."""
        ...

    def certify_session_key(self, nonce: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of the session key by the AK over ``nonce``."""
        ...

    def sign_session(self, message: bytes) -> bytes:
        """The session key's ES256 signature of ``message``: raw ``r || s``."""
        ...


class ApiError(Exception):
    """The service refused a call: HTTP status, reason code and message of its answer.

    ``code`` is the service's stable reason code (``docs/errors.md``), or ``http_<status>``
    when the answer carried no error document (a proxy's error page, say).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Verdict:
    """The service's attestation verdict."""

    status: str
    failures: tuple[tuple[str, str], ...]
    token: str | None
    attestation_id: str
    ak_name: str
    image_digest: str
    trust_vector: dict[str, int]
    unknown_event_types: tuple[str, ...]

    @property
    def affirming(self) -> bool:
        return self.status == "affirming" and self.token is not None


@dataclass(frozen=True)
class SessionInfo:
    """A started agent session."""

    session_id: str
    expires_at: str
    image_name: str
    image_digest: str
    attested: bool


@dataclass(frozen=True)
class Decision:
    """The policy's answer to one action request."""

    decision: str
    rule_id: str
    reason: str
    decision_id: str
    params_hash: str
    short_code: str
    approval_id: str | None = None
    approval_url: str | None = None
    grant: str | None = None


@dataclass(frozen=True)
class Approval:
    """An approval request as the caller's key may see it (the grant only for its agent)."""

    id: str
    state: str
    action: str
    resource: str
    params: dict[str, Any]
    params_hash: str
    short_code: str
    grant: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class GrantCheck:
    """The downstream's check of a grant: valid (and now used) or the reason it is not."""

    valid: bool
    code: str | None = None
    message: str | None = None
    grant_id: str | None = None


class ApiClient:
    """JSON over HTTP with one API key; non-2xx answers raise :class:`ApiError`."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float = 30.0,
                 client: httpx.Client | None = None, clock: Clock | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._http = client if client is not None else httpx.Client(timeout=timeout)
        # The key travels only in this header; it is never part of a URL or an error.
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._api_key = api_key
        self._clock: Clock = clock or SystemClock()  # a proof's iat
        # The session key: a signer (the TPM) and its public JWK, once a session key exists.
        self.session_signer: dpop.Signer | None = None
        self.session_jwk: dict[str, str] | None = None
        self.session_id: str | None = None  # the session started last
        self.dpop_nonce: str | None = None  # the last DPoP-Nonce the service sent

    def close(self) -> None:
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def response(self, method: str, path: str, *, json: Any = None,
                 params: dict[str, Any] | None = None,
                 timeout: float | None = None, session: str | None = None,
                 headers: dict[str, str] | None = None) -> httpx.Response:
        """The raw answer (no status check), for callers that read refusals themselves.

        With ``session``, the request carries a ``DPoP`` proof for that session (or for the
        attestation id, when starting one) signed by the session key. ``headers`` add to (or
        override) the client's own, e.g. a person's sign-in cookie.
        """
        headers = {**self._headers, **(headers or {})}
        kwargs: dict[str, Any] = {"params": params}
        body = b""
        if json is not None:
            # Serialised here, so the proof hashes exactly the bytes sent.
            body = _json_bytes(json)
            kwargs["content"] = body
            headers["Content-Type"] = "application/json"
        if timeout is not None:
            kwargs["timeout"] = timeout
        url = f"{self.base_url}{path}"
        if session is None:
            return self._http.request(method, url, headers=headers, **kwargs)
        sent = self.dpop_nonce
        headers["DPoP"] = self.proof(method, url, session, body)
        r = self._http.request(method, url, headers=headers, **kwargs)
        self.dpop_nonce = r.headers.get("DPoP-Nonce", self.dpop_nonce)
        if (r.status_code == 401 and _asks_for_nonce(r) and self.dpop_nonce is not None
                and self.dpop_nonce != sent):
            # RFC 9449 section 8: the service wants its nonce in the proof; retry once with
            # the one it just sent (a new proof: new jti, same body).
            headers["DPoP"] = self.proof(method, url, session, body)
            r = self._http.request(method, url, headers=headers, **kwargs)
            self.dpop_nonce = r.headers.get("DPoP-Nonce", self.dpop_nonce)
        return r

    def use_session(self, other: ApiClient) -> None:
        """Prove with ``other``'s session key and session (another worker of one agent)."""
        self.session_signer, self.session_jwk = other.session_signer, other.session_jwk
        self.session_id = other.session_id
        self.dpop_nonce = other.dpop_nonce

    def proof(self, method: str, url: str, session: str, body: bytes) -> str:
        """A session proof for one request (needs a session key: see ``AgentClient.attest``)."""
        if self.session_signer is None or self.session_jwk is None:
            raise RuntimeError("no session key: attest with a TPM first")
        return dpop.create_proof(self.session_signer, self.session_jwk, method=method, url=url,
                                 session_id=session, body=body, now=self._clock.now(),
                                 api_key=self._api_key, nonce=self.dpop_nonce)

    def call(self, method: str, path: str, *, json: Any = None,
             params: dict[str, Any] | None = None, timeout: float | None = None,
             session: str | None = None, headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON answer of a 2xx response; otherwise :class:`ApiError`."""
        r = self.response(method, path, json=json, params=params, timeout=timeout,
                          session=session, headers=headers)
        if r.is_success:
            return r.json() if r.content else None
        raise _error(r)

    def get_bytes(self, path: str, *, params: dict[str, Any] | None = None) -> bytes:
        """The raw body of a 2xx GET (exports are JSON Lines, not one JSON document)."""
        r = self.response("GET", path, params=params)
        if r.is_success:
            return r.content
        raise _error(r)


def _asks_for_nonce(r: httpx.Response) -> bool:
    # RFC 9449 section 9: WWW-Authenticate: DPoP error="use_dpop_nonce".
    challenge = r.headers.get("WWW-Authenticate", "")
    return challenge.startswith("DPoP ") and 'error="use_dpop_nonce"' in challenge


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _token_jti(token: str) -> str:
    # The attestation id names the session being started in its proof (``sid``); the
    # service verifies the token, the client only reads this claim.
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["jti"])


def _error(r: httpx.Response) -> ApiError:
    try:
        err = r.json()["error"]
        return ApiError(r.status_code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(r.status_code, f"http_{r.status_code}", r.reason_phrase)


class AgentClient(ApiClient):
    """The agent runtime's side of the protocol, with an ``agent`` key."""

    def bind_ak(self, tpm: Attester) -> str:
        """Bind the TPM's AK to its certified EK (MakeCredential/ActivateCredential).

        Returns the AK's TPM name (hex).  Needed once per tenant and AK.
        """
        challenge = self.call("POST", "/v1/attestation/ak/challenge", json={
            "ak_public": _b64(tpm.ak()),
            "ek_certificate": _b64(tpm.ek_certificate()),
            "ek_public": _b64(tpm.ek_public()),
        })
        # Only the TPM holding the certified EK, with exactly this AK loaded, can do this.
        secret = tpm.activate(base64.b64decode(challenge["credential_blob"]),
                              base64.b64decode(challenge["encrypted_secret"]))
        out = self.call("POST", "/v1/attestation/ak/activate", json={
            "credential_id": challenge["credential_id"], "secret": _b64(secret),
        })
        return str(out["ak_name"])

    def attest(self, tpm: Attester, manifest: bytes) -> Verdict:
        """Fetch a fresh nonce, quote over it and submit the evidence; returns the verdict.

        A ``contraindicated`` verdict is an answer, not an error: check ``verdict.affirming``.
        """
        nonce = base64.b64decode(self.call("POST", "/v1/attestation/challenge", json={})["nonce"])
        attest, signature = tpm.quote(nonce)
        # A fresh TPM-held session key, certified by the AK over the same nonce.
        session_key = tpm.new_session_key()
        certify, certify_sig = tpm.certify_session_key(nonce)
        body: dict[str, Any] = {
            "nonce": _b64(nonce),
            "quote": _b64(attest),
            "signature": _b64(signature),
            "ak_public": _b64(tpm.ak()),
            "ek_certificate": _b64(tpm.ek_certificate()),
            "pcrs": {"sha256": {str(i): v.hex() for i, v in tpm.read_pcrs().items()}},
            "image_manifest": manifest.decode("utf-8"),
            "session_key": _b64(session_key),
            "session_key_certify": _b64(certify),
            "session_key_signature": _b64(certify_sig),
        }
        log = tpm.event_log()
        if log is not None:
            body["event_log"] = _b64(log)
        v = self.call("POST", "/v1/attestation/verify", json=body)
        from sandboxsec.attestation.certify import parse_session_key

        self.session_signer = tpm.sign_session
        self.session_jwk = parse_session_key(session_key).jwk
        return Verdict(
            status=v["status"],
            failures=tuple((f["code"], f["message"]) for f in v["failures"]),
            token=v.get("token"),
            attestation_id=v["attestation_id"],
            ak_name=v["ak_name"],
            image_digest=v["image_digest"],
            trust_vector=dict(v.get("trust_vector", {})),
            unknown_event_types=tuple(v.get("unknown_event_types", ())),
        )

    def start_session(self, attestation_token: str) -> SessionInfo:
        """Start a session from an affirming attestation token (one token, one session)."""
        s = self.call("POST", "/v1/sessions", json={"attestation_token": attestation_token},
                      session=_token_jti(attestation_token))
        self.session_id = str(s["session_id"])
        return SessionInfo(session_id=s["session_id"], expires_at=s["expires_at"],
                           image_name=s["image_name"], image_digest=s["image_digest"],
                           attested=bool(s["attested"]))

    def record(self, session_id: str, kind: str, data: bytes,
               meta: dict[str, Any] | None = None) -> str:
        """Store one trajectory record (encrypted by the service); returns its id."""
        out = self.call("POST", f"/v1/sessions/{session_id}/trajectory",
                        json={"kind": kind, "data": _b64(data), "meta": meta or {}},
                        session=session_id)
        return str(out["record_id"])

    def request_action(self, session_id: str, action: str, resource: str,
                       params: dict[str, Any]) -> Decision:
        """Ask the policy about one action with its exact parameters."""
        d = self.call("POST", "/v1/actions", json={
            "session_id": session_id, "action": action, "resource": resource, "params": params,
        }, session=session_id)
        return Decision(
            decision=d["decision"], rule_id=d["rule_id"], reason=d["reason"],
            decision_id=d["decision_id"], params_hash=d["params_hash"],
            short_code=d["short_code"], approval_id=d.get("approval_id"),
            approval_url=d.get("approval_url"), grant=d.get("grant"),
        )

    def approval(self, approval_id: str, session_id: str | None = None) -> Approval:
        """The approval request now (with the grant once approved: only this agent sees it).

        The proof names ``session_id`` (default: the session this client started last)."""
        return _approval(self.call("GET", f"/v1/approvals/{approval_id}",
                                   session=session_id or self.session_id))

    def end_session(self, session_id: str) -> str:
        """End the session now (proved by its key); returns when it ended."""
        return str(self.call("POST", f"/v1/sessions/{session_id}/end",
                             session=session_id)["ended_at"])

    def wait(self, approval_id: str, session_id: str | None = None, *, timeout: float = 60.0,
             poll: float = 30.0) -> Approval:
        """Long-poll until the request leaves ``pending`` or ``timeout`` seconds pass.

        Never waits unbounded: at the timeout the request is returned still ``pending``.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            step = max(0.0, min(poll, remaining))
            a = _approval(self.call("GET", f"/v1/approvals/{approval_id}/wait",
                                    params={"timeout": f"{step:.3f}"}, timeout=step + 30.0,
                                    session=session_id or self.session_id))
            if a.state != "pending" or time.monotonic() >= deadline:
                return a

    def verify_grant(self, grant: str, action: str, params: dict[str, Any],
                     resource: str | None = None) -> GrantCheck:
        """What a downstream does before executing: valid once, else the reason code.

        A refusal (4xx) is returned as ``valid=False``; a service failure (5xx) raises.
        """
        body: dict[str, Any] = {"grant": grant, "action": action, "params": params}
        if resource is not None:
            body["resource"] = resource
        r = self.response("POST", "/v1/grants/verify", json=body)
        if r.is_success:
            return GrantCheck(valid=True, grant_id=r.json()["grant_id"])
        err = _error(r)
        if r.status_code >= 500:
            raise err
        return GrantCheck(valid=False, code=err.code, message=err.message)


def _approval(a: dict[str, Any]) -> Approval:
    return Approval(id=a["id"], state=a["state"], action=a["action"], resource=a["resource"],
                    params=dict(a["params"]), params_hash=a["params_hash"],
                    short_code=a["short_code"], grant=a.get("grant"), raw=a)
