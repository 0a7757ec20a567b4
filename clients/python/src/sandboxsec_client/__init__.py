"""sandboxsec-client: the sandboxsec API for agent runtimes, approvers, downstream systems,
auditors and administrators, in blocking (:mod:`.sync`) and async (:mod:`.aio`) flavours.

    from sandboxsec_client import AgentClient

    with AgentClient("https://sandboxsec.example", agent_key) as agent:
        # the TPM certifies a fresh session key; every session call is then signed by it
        verdict = agent.attest(tpm, manifest)
        session = agent.start_session(verdict.token)
        decision = agent.ask(session.session_id, "payment", "payee:acme", params)
        if decision.decision == "approval_required":
            approval = agent.wait(decision.approval_id, timeout=300)
"""

from sandboxsec_client._core import ProofSigner, RetryPolicy
from sandboxsec_client._flows import Attester, AttesterSigner, SessionKeyAttester
from sandboxsec_client.aio import (
    AsyncAdminClient,
    AsyncAgentClient,
    AsyncApproverClient,
    AsyncAuditorClient,
    AsyncDownstreamClient,
)
from sandboxsec_client.audit import (
    AuditInvalid,
    VerifiedCheckpoint,
    verify_checkpoint,
    verify_inclusion,
)
from sandboxsec_client.errors import (
    ApiError,
    AuthenticationError,
    ClientError,
    ConflictError,
    ForbiddenError,
    InputError,
    NotFoundError,
    OutcomeUnknownError,
    ParamsHashMismatchError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnavailableError,
    VerificationError,
)
from sandboxsec_client.grants import GrantInvalid, params_hash, verify_offline
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
from sandboxsec_client.proofs import (
    InsecureSignerWarning,
    SessionKeySigner,
    SessionProver,
    SoftwareP256Signer,
)
from sandboxsec_client.sync import (
    AdminClient,
    AgentClient,
    ApproverClient,
    AuditorClient,
    DownstreamClient,
)
from sandboxsec_client.tpm import TpmSessionKey

__version__ = "0.1.0"

__all__ = [
    "AdminClient",
    "AgentClient",
    "ApiError",
    "ApiKey",
    "ApiKeyCreated",
    "Approval",
    "ApproverClient",
    "AsyncAdminClient",
    "AsyncAgentClient",
    "AsyncApproverClient",
    "AsyncAuditorClient",
    "AsyncDownstreamClient",
    "Attester",
    "AttesterSigner",
    "AuditInvalid",
    "AuditKey",
    "AuditorClient",
    "AuthenticationError",
    "Checkpoint",
    "ClientError",
    "ConflictError",
    "Decision",
    "DownstreamClient",
    "ForbiddenError",
    "GrantCheck",
    "GrantClaims",
    "GrantInvalid",
    "InputError",
    "InsecureSignerWarning",
    "KeyStatus",
    "NotFoundError",
    "OutcomeUnknownError",
    "ParamsHashMismatchError",
    "Policy",
    "PolicyCheck",
    "ProofSigner",
    "RateLimitedError",
    "RecordCreated",
    "RetryPolicy",
    "ServerError",
    "SessionInfo",
    "SessionKeyAttester",
    "SessionKeySigner",
    "SessionProver",
    "SoftwareP256Signer",
    "TpmSessionKey",
    "TrajectoryRecord",
    "TransportError",
    "UnavailableError",
    "Verdict",
    "VerificationError",
    "VerifiedCheckpoint",
    "WhoAmI",
    "params_hash",
    "verify_checkpoint",
    "verify_inclusion",
    "verify_offline",
]
