"""Errors of the audit log.  Every code here is documented in docs/audit.md.

Verification failures carry the sequence number of the first entry that does not verify
(``seq``) when one can be named, so the CLI and the API can point the auditor at it.
"""

from __future__ import annotations

from sandboxsec.errors import (
    ConflictError,
    DependencyUnavailableError,
    ForbiddenError,
    InputError,
    NotFoundError,
    VerificationError,
)

__all__ = [
    "AuditChainBrokenError",
    "AuditCheckpointInvalidError",
    "AuditCheckpointKeyMismatchError",
    "AuditCheckpointSignatureError",
    "AuditConsistencyError",
    "AuditCosignatureInvalidError",
    "AuditEntryMalformedError",
    "AuditEntryOrderError",
    "AuditExportMalformedError",
    "AuditForkError",
    "AuditHistoryMismatchError",
    "AuditInclusionError",
    "AuditLogAlarmedError",
    "AuditRangeError",
    "AuditRootMismatchError",
    "AuditStateInvalidError",
    "AuditUnavailableError",
    "AuditUncoveredEntriesError",
    "AuditVerificationError",
    "AuditWitnessQuorumError",
    "AuditWitnessRefusedError",
    "StopsLog",
    "WitnessForkError",
    "WitnessOriginUnknownError",
    "WitnessProofInvalidError",
    "WitnessRequestMalformedError",
    "WitnessSignatureUntrustedError",
    "WitnessSizeConflictError",
]


class StopsLog:
    """Mixin of the integrity refusals that stop one log, or find it stopped: ``log_id`` names
    that log when the raiser knows it (a write retried after its own batch stopped the log is
    then told the cause, and only that log's writers are)."""

    log_id: str | None = None


class AuditUnavailableError(DependencyUnavailableError):
    """The audit log could not durably record this; the action it records did not happen."""

    code = "audit_unavailable"


class AuditRangeError(InputError):
    """The requested sequence range or tree size is outside the log."""

    code = "audit_range_invalid"


class AuditVerificationError(VerificationError):
    """An audit export, checkpoint or proof did not verify."""

    code = "audit_verification_failed"

    def __init__(self, message: str = "", *, seq: int | None = None) -> None:
        super().__init__(message)
        #: The first entry that does not verify, when one can be named.
        self.seq = seq


class AuditExportMalformedError(AuditVerificationError):
    """The export is not a well-formed sandboxsec audit export (header or record lines)."""

    code = "audit_export_malformed"


class AuditEntryMalformedError(AuditVerificationError):
    """An entry line is not a canonical entry of this log."""

    code = "audit_entry_malformed"


class AuditEntryOrderError(AuditVerificationError):
    """An entry is missing, repeated or out of order (its sequence number is not the next)."""

    code = "audit_entry_out_of_order"


class AuditChainBrokenError(AuditVerificationError):
    """An entry's hash is not the one its successor recorded: the entry was altered."""

    code = "audit_chain_broken"


class AuditRootMismatchError(AuditVerificationError):
    """The entries do not hash to the root of a signed checkpoint."""

    code = "audit_root_mismatch"


class AuditCheckpointInvalidError(AuditVerificationError):
    """A checkpoint is not a well-formed C2SP signed-note checkpoint of this log."""

    code = "audit_checkpoint_malformed"


class AuditCheckpointSignatureError(AuditVerificationError):
    """A checkpoint carries no valid signature by the trusted audit key."""

    code = "audit_checkpoint_signature_invalid"


class AuditForkError(AuditVerificationError):
    """Two validly signed checkpoints disagree about the same tree: the log forked."""

    code = "audit_fork_detected"


class AuditConsistencyError(AuditVerificationError):
    """A consistency proof between two checkpoints does not verify."""

    code = "audit_consistency_proof_invalid"


class AuditInclusionError(AuditVerificationError):
    """An inclusion proof does not place the entry under the checkpoint's root."""

    code = "audit_inclusion_proof_invalid"


class AuditUncoveredEntriesError(AuditVerificationError):
    """The export holds entries that no signed checkpoint covers, so they cannot be trusted."""

    code = "audit_entries_unsigned"


class AuditCosignatureInvalidError(AuditVerificationError):
    """A line claims to be a configured witness's cosignature but does not verify."""

    code = "audit_cosignature_invalid"


class AuditWitnessQuorumError(AuditVerificationError):
    """The newest checkpoint carries fewer valid witness cosignatures than the policy needs."""

    code = "audit_witness_quorum_not_met"


class AuditHistoryMismatchError(StopsLog, DependencyUnavailableError):
    """The stored log does not extend the last checkpoint this service signed: the past was
    altered behind the service's back.  The service refuses to sign and stops the log."""

    code = "audit_history_mismatch"


class AuditWitnessRefusedError(DependencyUnavailableError):
    """A witness refused a checkpoint as inconsistent with what it cosigned before (a fork or
    a rollback).  The log is stopped until an operator investigates."""

    code = "audit_witness_refused"


class AuditStateInvalidError(StopsLog, DependencyUnavailableError):
    """The state file holding the last signed checkpoint fails its integrity check."""

    code = "audit_state_invalid"


class AuditCheckpointKeyMismatchError(DependencyUnavailableError):
    """The log's last checkpoint was signed by another key than this service's checkpoint key:
    a log keeps one key, so nothing is signed into it (a node with foreign keys, or a key
    changed behind the log's back)."""

    code = "audit_checkpoint_key_mismatch"


class AuditLogAlarmedError(StopsLog, DependencyUnavailableError):
    """The log is stopped by an earlier integrity alarm; nothing more is appended or signed."""

    code = "audit_log_alarmed"


# --- the witness's answers (tlog-witness add-checkpoint), each with the status the spec gives


class WitnessRequestMalformedError(InputError):
    """The add-checkpoint body is not ``old N``, proof lines, a blank line and a checkpoint."""

    code = "witness_request_malformed"


class WitnessSignatureUntrustedError(ForbiddenError):
    """No signature on the checkpoint verifies under a log key the witness trusts."""

    code = "witness_signature_untrusted"


class WitnessOriginUnknownError(NotFoundError):
    """The witness does not witness a log of this origin."""

    code = "witness_origin_unknown"


class WitnessSizeConflictError(ConflictError):
    """The old size is not the size the witness last cosigned; ``size`` is that size."""

    code = "witness_size_conflict"

    def __init__(self, message: str = "", *, size: int) -> None:
        super().__init__(message)
        self.size = size


class WitnessForkError(ConflictError):
    """A checkpoint of the size the witness holds, with another root: the log forked."""

    code = "witness_fork_detected"


class WitnessProofInvalidError(VerificationError):
    """The consistency proof from the witnessed tree to the new checkpoint does not verify."""

    code = "witness_consistency_proof_invalid"
