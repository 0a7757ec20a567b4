"""Reason codes of the encryption domain (documented in ``docs/encryption.md``).

Every way a ciphertext can fail to open (wrong key, flipped bit, moved row, truncated or
reordered stream, malformed header) is the single opaque :class:`DecryptionFailedError`, so
an attacker probing stored data learns nothing from the answer.
"""

from __future__ import annotations

from sandboxsec.errors import (
    ConflictError,
    DependencyUnavailableError,
    InputError,
    PayloadTooLargeError,
    VerificationError,
)

__all__ = [
    "DecryptionFailedError",
    "KeyProviderMismatchError",
    "KeyProviderUnavailableError",
    "KeyVersionConflictError",
    "KeyVersionInvalidError",
    "KeyVersionRetiredError",
    "NodeIdentityMismatchError",
    "TenantKeyMissingError",
    "TenantKeysShreddedError",
    "TrajectoryKindInvalidError",
    "TrajectoryRecordMissingError",
    "TrajectoryRecordReattributedError",
    "TrajectoryRecordReorderedError",
    "TrajectoryRecordTooLargeError",
    "TrajectorySessionClosedError",
]


class KeyProviderUnavailableError(DependencyUnavailableError):
    """The key provider holding the root key cannot be reached; nothing was read or written."""

    code = "key_provider_unavailable"


class TenantKeyMissingError(KeyProviderUnavailableError):
    """The tenant's own key is missing from the key provider although the tenant was not
    shredded (a lost or removed key file or HSM object); nothing was read or written."""

    code = "tenant_key_missing"


class KeyProviderMismatchError(DependencyUnavailableError):
    """The tenant's keys were wrapped by a different root key than the configured provider's."""

    code = "key_provider_mismatch"


class NodeIdentityMismatchError(DependencyUnavailableError):
    """This node's root key, HSM keys or service key files are not the cluster's: the node
    refuses to start (and to sign or verify anything) rather than act with another identity."""

    code = "node_identity_mismatch"


class DecryptionFailedError(VerificationError):
    """The stored ciphertext could not be decrypted and authenticated."""

    code = "decryption_failed"


class TrajectoryRecordTooLargeError(PayloadTooLargeError):
    """The trajectory record exceeds the configured size limit; it was not stored."""

    code = "trajectory_record_too_large"


class KeyVersionRetiredError(ConflictError):
    """The data is wrapped by a key version below the tenant's minimum decryption version."""

    code = "key_version_retired"


class KeyVersionConflictError(ConflictError):
    """A concurrent key change made this key version first; nothing was changed (retry)."""

    code = "key_version_conflict"


class KeyVersionInvalidError(InputError):
    """The requested key version does not exist for this tenant."""

    code = "key_version_invalid"


class TenantKeysShreddedError(ConflictError):
    """The tenant's keys were destroyed (crypto-shredded); its data can no longer be read."""

    code = "tenant_keys_shredded"


class TrajectorySessionClosedError(ConflictError):
    """The session has ended or expired; no more trajectory records can be added to it."""

    code = "trajectory_session_closed"


class TrajectoryKindInvalidError(InputError):
    """A record kind is 1-64 characters: lower-case letters, digits, '.', '_' or '-'."""

    code = "trajectory_kind_invalid"


class TrajectoryRecordReorderedError(VerificationError):
    """A record's stored position in its session is not the one sealed inside it (rows were
    reordered, or two rows claim one position)."""

    code = "trajectory_record_reordered"


class TrajectoryRecordReattributedError(VerificationError):
    """A record's stored author is not the API key sealed inside it as its writer."""

    code = "trajectory_record_reattributed"


class TrajectoryRecordMissingError(VerificationError):
    """Records of the session are missing: its positions have a gap, or fewer records remain
    than the session's head counts."""

    code = "trajectory_record_missing"
