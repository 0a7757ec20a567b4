"""Reason codes of people, passkeys, sign-in and passkey-signed decisions (docs/errors.md)."""

from __future__ import annotations

from sandboxsec.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InputError,
    NotFoundError,
    VerificationError,
)

__all__ = [
    "ApprovalAlreadyVotedError",
    "ApprovalNotRoutedError",
    "ApprovalPersonRequiredError",
    "AssertionChallengeMismatchError",
    "AssertionChallengeUnknownError",
    "AssertionCounterError",
    "AssertionCredentialMismatchError",
    "AssertionCrossOriginError",
    "AssertionFlagsError",
    "AssertionMalformedError",
    "AssertionOriginMismatchError",
    "AssertionReplayedError",
    "AssertionRpMismatchError",
    "AssertionSignatureInvalidError",
    "AssertionUserNotVerifiedError",
    "ChallengeExpiredError",
    "CredentialDuplicateError",
    "CredentialRevokedError",
    "CredentialUnknownError",
    "EnrolmentInvalidError",
    "OriginForbiddenError",
    "PersonHandleTakenError",
    "PersonInvalidError",
    "RegistrationInvalidError",
    "SessionOwnerInvalidError",
    "SessionOwnerSetError",
    "SigninRequiredError",
]


class PersonInvalidError(InputError):
    """A person's name, handle or groups are malformed."""

    code = "person_invalid"


class PersonHandleTakenError(ConflictError):
    """Another person of this tenant already has this handle."""

    code = "person_handle_taken"


class EnrolmentInvalidError(NotFoundError):
    """The enrolment link is unknown, used or expired: ask an admin for a new one."""

    code = "enrolment_invalid"


class RegistrationInvalidError(VerificationError):
    """The passkey registration did not verify (origin, RP id, user verification, format)."""

    code = "registration_invalid"


class CredentialDuplicateError(ConflictError):
    """This passkey (credential id) is registered already."""

    code = "credential_duplicate"


class CredentialUnknownError(AuthenticationError):
    """The passkey is not registered to any enabled person."""

    code = "credential_unknown"


class CredentialRevokedError(AuthenticationError):
    """The passkey was revoked by an admin (a lost or replaced device): it signs nothing."""

    code = "credential_revoked"


class SigninRequiredError(AuthenticationError):
    """Sign in with your passkey first (no sign-in, or it expired)."""

    code = "signin_required"


class OriginForbiddenError(ForbiddenError):
    """A signed-in request must come from the configured public origin."""

    code = "origin_forbidden"


class ChallengeExpiredError(ConflictError):
    """The WebAuthn challenge expired; ask for a new one."""

    code = "challenge_expired"


class AssertionMalformedError(InputError):
    """The WebAuthn assertion is not well formed (base64url fields, clientDataJSON, authData)."""

    code = "assertion_malformed"


class AssertionChallengeUnknownError(NotFoundError):
    """No such challenge for this person and request."""

    code = "assertion_challenge_unknown"


class AssertionReplayedError(ConflictError):
    """The challenge of this assertion was used already: assertions are single use."""

    code = "assertion_replayed"


class AssertionChallengeMismatchError(VerificationError):
    """The assertion signs another challenge: another request, params or decision."""

    code = "assertion_challenge_mismatch"


class AssertionOriginMismatchError(VerificationError):
    """The assertion was made on another origin than the configured public origin."""

    code = "assertion_origin_mismatch"


class AssertionCrossOriginError(VerificationError):
    """The assertion was made inside a cross-origin frame."""

    code = "assertion_cross_origin"


class AssertionRpMismatchError(VerificationError):
    """The authenticator data names another relying party (rpIdHash)."""

    code = "assertion_rp_mismatch"


class AssertionUserNotVerifiedError(VerificationError):
    """The authenticator did not verify the user (UV flag clear); user verification is required."""

    code = "assertion_user_not_verified"


class AssertionSignatureInvalidError(VerificationError):
    """The assertion's signature does not verify under the registered public key."""

    code = "assertion_signature_invalid"


class AssertionCounterError(VerificationError):
    """The authenticator's sign counter did not increase (a cloned authenticator?)."""

    code = "assertion_counter_regressed"


class AssertionFlagsError(VerificationError):
    """The assertion's flags contradict the registration (user handle, backup eligibility)."""

    code = "assertion_flags_mismatch"


class AssertionCredentialMismatchError(VerificationError):
    """The passkey belongs to another person than the one signed in."""

    code = "assertion_credential_mismatch"


class ApprovalNotRoutedError(ForbiddenError):
    """This approval request is not routed to this person."""

    code = "approval_not_routed"


class ApprovalPersonRequiredError(ForbiddenError):
    """The policy requires a person's passkey to approve this request, not an API key."""

    code = "approval_person_required"


class ApprovalAlreadyVotedError(ConflictError):
    """This person already decided on this request; a quorum needs different people."""

    code = "approval_already_voted"


class SessionOwnerSetError(ConflictError):
    """The session's owner is set already; it is fixed for the session's life."""

    code = "session_owner_set"


class SessionOwnerInvalidError(InputError):
    """The owner must be an enabled person of the session's tenant."""

    code = "session_owner_invalid"
