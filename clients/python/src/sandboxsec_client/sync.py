"""Blocking clients, one per role.  Each method is one flow of :mod:`._flows`.

Every client takes the service's base URL and the role's API key, and optionally:
``timeout`` (seconds per request), ``retry`` (:class:`RetryPolicy`), ``proof`` (a ``DPoP``
proof signer ``(method, url, body) -> header``, for TPM-bound sessions) and ``http`` (your
own ``httpx.Client``: proxies, TLS settings; then you close it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec_client import _flows as f
from sandboxsec_client._core import ProofSigner, RetryPolicy
from sandboxsec_client._flows import Attester, AttesterSigner, SessionKeyAttester
from sandboxsec_client._transport import SyncTransport
from sandboxsec_client.audit import VerifiedCheckpoint, verify_inclusion
from sandboxsec_client.grants import GrantDecoder, parse_published_keys, verify_offline
from sandboxsec_client.models import (
    ApiKey,
    ApiKeyCreated,
    Approval,
    AuditKey,
    Checkpoint,
    Decision,
    GrantCheck,
    GrantClaims,
    KeyStatus,
    Policy,
    PolicyCheck,
    RecordCreated,
    SessionInfo,
    TrajectoryRecord,
    Verdict,
    WhoAmI,
)
from sandboxsec_client.proofs import SessionKeySigner, SessionProver

__all__ = ["AdminClient", "AgentClient", "ApproverClient", "AuditorClient",
           "DownstreamClient"]


class AgentClient(SyncTransport):
    """The agent runtime inside the sandbox (an ``agent`` key): attest, start a session,
    ask before acting, wait for the person, record the trajectory."""

    def bind_ak(self, tpm: Attester) -> str:
        """Bind the TPM's AK to its certified EK (once per tenant and AK); the AK name."""
        return self.run(f.bind_ak(tpm))

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, proof: ProofSigner | None = None,
                 session_key: SessionKeySigner | None = None, session_id: str | None = None,
                 htu_base: str | None = None, http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 ) -> None:
        #: The built-in ``DPoP`` prover (``None`` when ``proof`` replaces it): it signs with
        #: ``session_key``, or with the key a :class:`SessionKeyAttester` had certified when
        #: :meth:`attest` ran, for ``session_id`` or the session :meth:`start_session` started.
        self.prover: SessionProver | None = None
        if proof is None:
            self.prover = SessionProver(api_key, session_key, session_id=session_id,
                                        htu_base=htu_base)
            proof = self.prover
        super().__init__(base_url, api_key, timeout=timeout, retry=retry, proof=proof,
                         http=http, sleep=sleep)

    def attest(self, tpm: Attester, manifest: bytes) -> Verdict:
        """Challenge, quote (and certify a fresh session key when the TPM holds one),
        verify: the verdict (check ``verdict.affirming``).  With a session key, this client's
        session calls are then signed by it."""
        verdict, session_key = self.run(f.attest(tpm, manifest))
        if (session_key is not None and self.prover is not None
                and isinstance(tpm, SessionKeyAttester)):
            self.prover.attach(AttesterSigner(tpm, session_key))
        return verdict

    def start_session(self, attestation_token: str) -> SessionInfo:
        """A session from an affirming attestation token (one token, one session); approval
        reads then prove for it."""
        session = self.run(f.start_session(attestation_token))
        if self.prover is not None:
            self.prover.session_id = session.session_id
        return session

    def use_session(self, other: AgentClient) -> None:
        """Prove with ``other``'s session key and session (another worker of one agent)."""
        if self.prover is None or other.prover is None:
            raise ValueError("both clients must use the built-in prover")
        self.prover.share(other.prover)

    def session(self, session_id: str) -> SessionInfo:
        """The session as the service sees it."""
        return self.run(f.get_session(session_id))

    def record(self, session_id: str, kind: str, data: bytes,
               meta: Mapping[str, Any] | None = None) -> RecordCreated:
        """Store one trajectory record (encrypted by the service)."""
        return self.run(f.record(session_id, kind, data, meta))

    def ask(self, session_id: str, action: str, resource: str,
            params: Mapping[str, Any]) -> Decision:
        """The policy's decision on one action with its exact params."""
        return self.run(f.ask(session_id, action, resource, params))

    def approval(self, approval_id: str) -> Approval:
        """The approval request now (with its grant once approved)."""
        return self.run(f.approval(approval_id))

    def wait(self, approval_id: str, *, timeout: float = 60.0,
             poll: float = 30.0) -> Approval:
        """Until the request leaves ``pending`` or ``timeout`` passes (then still pending);
        survives dropped connections."""
        return self.run(f.wait(approval_id, timeout, poll))


class ApproverClient(SyncTransport):
    """The person's side (an ``approver`` key): list what waits, decide exactly what was
    shown."""

    def list_requests(self, *, state: str | None = "pending",
                      session_id: str | None = None,
                      limit: int = 50) -> list[Approval]:
        """Approval requests, newest first (pending ones by default)."""
        return self.run(f.list_approvals(state, session_id, limit))

    def get(self, approval_id: str) -> Approval:
        """One request with its exact params."""
        return self.run(f.approval(approval_id))

    def approve(self, request: Approval | str, params_hash: str | None = None) -> Approval:
        """Approve; given the :class:`Approval` shown, its params are re-hashed first."""
        return self.run(f.decide(request, "approve", params_hash))

    def deny(self, request: Approval | str, params_hash: str | None = None) -> Approval:
        """Deny; same checks as :meth:`approve`."""
        return self.run(f.decide(request, "deny", params_hash))


class DownstreamClient(SyncTransport):
    """The system that executes (a payment system...): check a grant before acting.

    ``verify_grant`` is authoritative and uses the grant up; ``verify_offline`` is a
    pre-check from the published keys that cannot know whether the grant was used.
    """

    def verify_grant(self, grant: str, action: str, params: Mapping[str, Any],
                     resource: str | None = None) -> GrantCheck:
        """Valid once (and now used), or the reason it is not; 5xx raises."""
        return self.run(f.verify_grant(grant, action, params, resource))

    def published_keys(self) -> dict[str, Ed25519PublicKey]:
        """The grant signing keys, from the JWK Set at ``/v1/grants/jwks`` (no API key needed)."""
        return parse_published_keys(self.run(f.grant_keys()))

    def verify_offline(self, grant: str, action: str, params: Mapping[str, Any],
                       resource: str | None = None, *,
                       keys: Mapping[str, Ed25519PublicKey] | None = None,
                       now: datetime | None = None,
                       decoder: GrantDecoder | None = None) -> GrantClaims:
        """Signature, expiry, action, params and resource, without using the grant up."""
        return verify_offline(grant, keys if keys is not None else self.published_keys(),
                              action=action, params=params, resource=resource, now=now,
                              decoder=decoder)


class AuditorClient(SyncTransport):
    """The auditor (an ``auditor`` key): checkpoints, proofs and exports.  An export is
    checked offline with ``sandboxsec audit verify EXPORT --public-key PUB``."""

    def checkpoint(self) -> Checkpoint:
        """The latest signed checkpoint."""
        return self.run(f.checkpoint())

    def key(self) -> AuditKey:
        """The log's public key (PEM) and signed-note verifier key."""
        return self.run(f.audit_key())

    def export(self, start: int = 0, end: int | None = None,
               since: int | None = None) -> bytes:
        """The JSON Lines export of ``start <= seq < end``."""
        return self.run(f.export(start, end, since))

    def inclusion_proof(self, seq: int, size: int | None = None) -> dict[str, Any]:
        """Entry ``seq``'s RFC 9162 inclusion proof and the checkpoint it proves into."""
        return self.run(f.inclusion_proof(seq, size))

    def verified_inclusion(self, seq: int, public_key_pem: str | bytes, key_name: str, *,
                           size: int | None = None) -> VerifiedCheckpoint:
        """Entry ``seq``'s proof, checked here against the key received out of band."""
        return verify_inclusion(self.run(f.inclusion_proof(seq, size)), public_key_pem,
                                key_name)

    def consistency_proof(self, first: int, second: int) -> dict[str, Any]:
        """The proof that the tree of size ``second`` extends the one of size ``first``."""
        return self.run(f.consistency_proof(first, second))


class AdminClient(SyncTransport):
    """The tenant's administrator (an ``admin`` key): keys, policy, trajectories."""

    def whoami(self) -> WhoAmI:
        """The tenant and role of this key."""
        return self.run(f.whoami())

    def api_keys(self) -> list[ApiKey]:
        """The tenant's API keys (never their secrets)."""
        return self.run(f.list_api_keys())

    def create_api_key(self, role: str, label: str = "") -> ApiKeyCreated:
        """A new key for ``role``; its secret is in the answer only."""
        return self.run(f.create_api_key(role, label))

    def revoke_api_key(self, key_id: str) -> None:
        """Revoke a key at once."""
        self.run(f.revoke_api_key(key_id))

    def key_status(self) -> KeyStatus:
        """The tenant's encryption key versions."""
        return self.run(f.key_status())

    def rotate_keys(self, *, rewrap: bool = False) -> KeyStatus:
        """A new key version (old data stays readable)."""
        return self.run(f.rotate_keys(rewrap))

    def rewrap_keys(self) -> dict[str, Any]:
        """Re-wrap data keys under the current version."""
        return self.run(f.rewrap_keys())

    def retire_keys(self, min_decryption_version: int) -> KeyStatus:
        """Refuse decryption under versions below ``min_decryption_version``."""
        return self.run(f.retire_keys(min_decryption_version))

    def policy(self) -> Policy:
        """The action policy in force."""
        return self.run(f.get_policy())

    def replace_policy(self, text: str, *, base_version: int | None = None) -> Policy:
        """Replace the policy (refused if ``base_version`` is no longer current)."""
        return self.run(f.put_policy(text, base_version))

    def validate_policy(self, text: str) -> PolicyCheck:
        """Whether ``text`` would be accepted."""
        return self.run(f.validate_policy(text))

    def trajectory(self, session_id: str, *, limit: int = 100, after: str | None = None,
                   kind: str | None = None) -> tuple[list[TrajectoryRecord], str | None]:
        """A page of decrypted records and the cursor of the next page."""
        return self.run(f.list_records(session_id, limit, after, kind))

    def read_record(self, session_id: str, record_id: str) -> TrajectoryRecord:
        """One decrypted record (the read is audited)."""
        return self.run(f.read_record(session_id, record_id))
