"""Errors of the audit log.  Every code here is documented in docs/audit.md.

Verification failures carry the sequence number of the first entry that does not verify
(``seq``) when one can be named, so the CLI and the API can point the auditor at it.
"""

from __future__ import annotations

from sandboxsec.errors import DependencyUnavailableError, InputError, VerificationError

__all__ = [
    "AuditChainBrokenError",
    "AuditCheckpointInvalidError",
    "AuditCheckpointSignatureError",
    "AuditConsistencyError",
    "AuditEntryMalformedError",
    "AuditEntryOrderError",
    "AuditExportMalformedError",
    "AuditForkError",
    "AuditInclusionError",
    "AuditRangeError",
    "AuditRootMismatchError",
    "AuditUnavailableError",
    "AuditUncoveredEntriesError",
    "AuditVerificationError",
]


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
