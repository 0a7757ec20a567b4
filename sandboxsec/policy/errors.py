"""Reason codes of the policy engine, approvals and grants.

One class per reason code; every code is documented in ``docs/policy.md``.
"""

from __future__ import annotations

from sandboxsec.errors import (
    ConflictError,
    DependencyUnavailableError,
    InputError,
    NotFoundError,
    PayloadTooLargeError,
    VerificationError,
)

__all__ = [
    "ActionInvalidError",
    "ActionSessionExpiredError",
    "ActionTargetConflictError",
    "ActionTargetInvalidError",
    "AmountInvalidError",
    "ApprovalExpiredError",
    "ApprovalHashMismatchError",
    "ApprovalNotPendingError",
    "ApprovalPendingLimitError",
    "ApprovalPolicyDeniedError",
    "GrantActionMismatchError",
    "GrantAlreadyUsedError",
    "GrantExpiredError",
    "GrantKeyUnavailableError",
    "GrantMalformedError",
    "GrantNotFoundError",
    "GrantParamsMismatchError",
    "GrantPolicyDeniedError",
    "GrantResourceMismatchError",
    "GrantSessionEndedError",
    "GrantSignatureInvalidError",
    "ParamsNotCanonicalError",
    "ParamsTextUnsafeError",
    "ParamsTooLargeError",
    "PolicyInvalidError",
    "PolicyTooLargeError",
    "PolicyVersionConflictError",
]


class ParamsNotCanonicalError(InputError):
    """The action params cannot be put in canonical form (floats, non-string keys, bad text)."""

    code = "params_not_canonical"


class ParamsTooLargeError(PayloadTooLargeError):
    """The action params exceed the size or nesting limit."""

    code = "params_too_large"


class AmountInvalidError(InputError):
    """An amount must be a decimal string like ``"125.50"`` (no sign, exponent or spaces)."""

    code = "action_amount_invalid"


class ActionInvalidError(InputError):
    """The action, resource or a required parameter of the action is missing or malformed."""

    code = "action_invalid"


class ActionTargetInvalidError(ActionInvalidError):
    """The action's target (domain, payee, app) has no canonical form: not a valid domain
    name, whitespace, percent-encoding, mixed scripts, or an id not written in canonical form."""

    code = "action_target_invalid"


class ActionTargetConflictError(ActionInvalidError):
    """The resource and the params name different targets (or more than one kind of target);
    an action has exactly one."""

    code = "action_target_conflict"


class ParamsTextUnsafeError(ParamsNotCanonicalError):
    """A param (name or value) holds a character that does not display as itself: a bidi
    control, an invisible or zero-width character, a line separator, a look-alike space."""

    code = "params_text_unsafe"


class ActionSessionExpiredError(ConflictError):
    """The session has expired or ended; start a new attested session."""

    code = "action_session_expired"


class PolicyInvalidError(InputError):
    """The policy text does not parse or validate; the message names the failing line."""

    code = "policy_invalid"

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class PolicyTooLargeError(PayloadTooLargeError):
    """The policy text exceeds the size or rule-count limit."""

    code = "policy_too_large"


class PolicyVersionConflictError(ConflictError):
    """The policy changed since the version the caller based its change on."""

    code = "policy_version_conflict"


class ApprovalNotPendingError(ConflictError):
    """The approval request was already decided, expired or consumed."""

    code = "approval_not_pending"


class ApprovalPendingLimitError(ConflictError):
    """The session already has the most pending approval requests allowed; wait for answers."""

    code = "approval_pending_limit"


class ApprovalPolicyDeniedError(ConflictError):
    """The policy in force now denies this request (it changed since the request was made);
    it can no longer be approved."""

    code = "approval_policy_denied"


class ApprovalExpiredError(ConflictError):
    """The approval request expired before it was decided."""

    code = "approval_expired"


class ApprovalHashMismatchError(VerificationError):
    """The params_hash sent by the approver differs from the request's (not what was shown)."""

    code = "approval_params_mismatch"


class GrantMalformedError(VerificationError):
    """The grant token is not a well-formed grant (compact JWS, or the legacy ``sgr1`` form)."""

    code = "grant_malformed"


class GrantSignatureInvalidError(VerificationError):
    """The grant token's signature does not verify under the service's grant key."""

    code = "grant_signature_invalid"


class GrantNotFoundError(NotFoundError):
    """No such grant for this tenant."""

    code = "grant_not_found"


class GrantAlreadyUsedError(ConflictError):
    """The grant was used already; grants are single use."""

    code = "grant_already_used"


class GrantExpiredError(VerificationError):
    """The grant has expired."""

    code = "grant_expired"


class GrantParamsMismatchError(VerificationError):
    """The params differ from the ones the grant was issued for."""

    code = "grant_params_mismatch"


class GrantPolicyDeniedError(VerificationError):
    """The policy in force now denies this action (or requires a person's approval for a grant
    issued without one): the grant no longer verifies."""

    code = "grant_policy_denied"


class GrantActionMismatchError(VerificationError):
    """The action differs from the one the grant was issued for."""

    code = "grant_action_mismatch"


class GrantResourceMismatchError(VerificationError):
    """The resource differs from the one the grant was issued for."""

    code = "grant_resource_mismatch"


class GrantSessionEndedError(VerificationError):
    """The session the grant was issued to has ended or expired."""

    code = "grant_session_ended"


class GrantKeyUnavailableError(DependencyUnavailableError):
    """The grant signing key cannot be unwrapped or stored now; no grant was issued or accepted."""

    code = "grant_key_unavailable"
