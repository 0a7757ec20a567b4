"""Reason codes of vTPM quotes, AK binding, event logs, attestation tokens and sessions.

Every class carries one stable reason code (documented in ``docs/attestation.md``).  The
verifier collects these as *failures* of a contraindicated verdict; the API raises the
nonce, credential and token ones directly.  Image and certificate-chain codes live in
:mod:`sandboxsec.attestation.image_errors`.
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
    "AkActivationFailedError",
    "AkAttributesInvalidError",
    "AkCredentialExpiredError",
    "AkCredentialUsedError",
    "AkNameMismatchError",
    "AkNotBoundError",
    "AkPublicMalformedError",
    "AttestationError",
    "AttestationKeyUnavailableError",
    "EkCertificateKeyMismatchError",
    "EkCertificateMissingError",
    "EkPublicUnsupportedError",
    "EventLogDigestNotAllowedError",
    "EventLogMalformedError",
    "EventLogReplayMismatchError",
    "EventLogRequiredError",
    "EventLogTooLargeError",
    "EvidenceMalformedError",
    "NonceExpiredError",
    "NonceReplayedError",
    "NonceUnknownError",
    "PcrReferenceMismatchError",
    "PcrReferenceNotQuotedError",
    "QuoteAlgorithmRefusedError",
    "QuoteClockRollbackError",
    "QuoteClockUnsafeError",
    "QuoteMagicInvalidError",
    "QuoteMalformedError",
    "QuoteNonceMismatchError",
    "QuotePcrDigestMismatchError",
    "QuotePcrSelectionError",
    "QuoteSignatureInvalidError",
    "QuoteSignatureMalformedError",
    "QuoteTypeInvalidError",
    "SessionTokenRequiredError",
    "TokenExpiredError",
    "TokenInvalidError",
    "TokenNotAffirmingError",
    "TokenReusedError",
    "TokenTenantMismatchError",
]


class AttestationError(VerificationError):
    """Attestation evidence did not verify."""

    code = "attestation_failed"


# -- evidence envelope ---------------------------------------------------------------------


class EvidenceMalformedError(InputError):
    """A field of the evidence is not valid base64, hex or JSON of the expected shape."""

    code = "attestation_evidence_malformed"


# -- nonces ----------------------------------------------------------------------------------


class NonceUnknownError(AttestationError):
    """The nonce was never issued to this tenant."""

    code = "attestation_nonce_unknown"


class NonceExpiredError(AttestationError):
    """The nonce is past its expiry."""

    code = "attestation_nonce_expired"


class NonceReplayedError(AttestationError):
    """The nonce was already used by an earlier submission."""

    code = "attestation_nonce_replayed"


# -- the quote -------------------------------------------------------------------------------


class QuoteMalformedError(AttestationError):
    """The quote is not a well-formed TPMS_ATTEST."""

    code = "quote_malformed"


class QuoteMagicInvalidError(AttestationError):
    """The quote's magic is not TPM_GENERATED_VALUE: the TPM did not generate it."""

    code = "quote_magic_invalid"


class QuoteTypeInvalidError(AttestationError):
    """The attestation structure is not of type TPM_ST_ATTEST_QUOTE."""

    code = "quote_type_invalid"


class QuoteNonceMismatchError(AttestationError):
    """The quote's extraData differs from the submitted nonce."""

    code = "quote_nonce_mismatch"


class QuoteSignatureMalformedError(AttestationError):
    """The signature is not a well-formed TPMT_SIGNATURE."""

    code = "quote_signature_malformed"


class QuoteAlgorithmRefusedError(AttestationError):
    """A signature scheme, hash or PCR bank outside the pinned policy (a downgrade)."""

    code = "quote_algorithm_refused"


class QuoteSignatureInvalidError(AttestationError):
    """The quote's signature does not verify under the AK."""

    code = "quote_signature_invalid"


class QuotePcrSelectionError(AttestationError):
    """The reported PCR values do not match the quote's PCR selection."""

    code = "quote_pcr_selection_mismatch"


class QuotePcrDigestMismatchError(AttestationError):
    """The quote's pcrDigest is not the hash of the reported PCR values."""

    code = "quote_pcr_digest_mismatch"


class QuoteClockUnsafeError(AttestationError):
    """The TPM clock is not marked safe (it may have been rolled back)."""

    code = "quote_clock_unsafe"


class QuoteClockRollbackError(AttestationError):
    """The reset or restart count went backwards for this AK: a stale or replayed quote."""

    code = "quote_clock_rollback"


class PcrReferenceMismatchError(AttestationError):
    """A quoted PCR differs from (or lacks) the image's signed reference value."""

    code = "pcr_reference_mismatch"


class PcrReferenceNotQuotedError(AttestationError):
    """A PCR the image's reference values name (by value or by event digests) is not in the
    signed quote, or the event log bank the allow-list uses was not matched against it."""

    code = "pcr_reference_not_quoted"


# -- the attestation key ---------------------------------------------------------------------


class AkPublicMalformedError(AttestationError):
    """The AK public area is not a well-formed TPM2B_PUBLIC of a supported key."""

    code = "ak_public_malformed"


class AkAttributesInvalidError(AttestationError):
    """The AK is not a restricted, fixedTPM signing key with a strong name algorithm."""

    code = "ak_attributes_invalid"


class AkNotBoundError(AttestationError):
    """The AK was never bound to a certified EK of this tenant (MakeCredential round)."""

    code = "ak_not_bound"


class AkNameMismatchError(AttestationError):
    """The AK or EK differs from the one bound by the credential round."""

    code = "ak_binding_mismatch"


class AkCredentialExpiredError(AttestationError):
    """The AK credential challenge is past its expiry."""

    code = "ak_credential_expired"


class AkCredentialUsedError(ConflictError):
    """The AK credential challenge was already answered (once, right or wrong)."""

    code = "ak_credential_used"


class AkActivationFailedError(AttestationError):
    """The returned secret does not match: the TPM holding the EK did not activate it."""

    code = "ak_activation_failed"


class EkCertificateMissingError(AttestationError):
    """No EK certificate was provided."""

    code = "ek_certificate_missing"


class EkCertificateKeyMismatchError(AttestationError):
    """The EK public area does not hold the key of the EK certificate."""

    code = "ek_certificate_key_mismatch"


class EkPublicUnsupportedError(AttestationError):
    """The EK key type, curve or size is not supported for credential protection."""

    code = "ek_public_unsupported"


# -- event logs ------------------------------------------------------------------------------


class EventLogMalformedError(AttestationError):
    """The event log is not a well-formed TCG PC Client crypto-agile log."""

    code = "eventlog_malformed"


class EventLogTooLargeError(PayloadTooLargeError):
    """The event log exceeds the size or event-count limit."""

    code = "eventlog_too_large"


class EventLogReplayMismatchError(AttestationError):
    """Replaying the event log does not give the quoted PCR values."""

    code = "eventlog_replay_mismatch"


class EventLogDigestNotAllowedError(AttestationError):
    """An event in a PCR the image pins by event digests has a digest not on its list."""

    code = "eventlog_digest_not_allowed"


class EventLogRequiredError(AttestationError):
    """The image pins event digests, so an event log must be submitted."""

    code = "eventlog_required"


# -- attestation tokens ----------------------------------------------------------------------


class TokenInvalidError(AttestationError):
    """The attestation token is malformed or its signature does not verify."""

    code = "attestation_token_invalid"


class TokenExpiredError(AttestationError):
    """The attestation token is past its expiry."""

    code = "attestation_token_expired"


class TokenTenantMismatchError(AttestationError):
    """The attestation token was issued to another tenant."""

    code = "attestation_token_tenant_mismatch"


class TokenNotAffirmingError(AttestationError):
    """The attestation token does not carry an affirming verdict."""

    code = "attestation_token_not_affirming"


class TokenReusedError(ConflictError):
    """The attestation token already started a session."""

    code = "attestation_token_reused"


class SessionTokenRequiredError(InputError):
    """A session needs an attestation token."""

    code = "session_attestation_required"


class AttestationKeyUnavailableError(DependencyUnavailableError):
    """The service's attestation signing key cannot be read or created."""

    code = "attestation_key_unavailable"
