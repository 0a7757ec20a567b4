"""Reason codes of the session key and its TPM2_Certify (see ``certify.py``).

A failure is one of the verdict's failures (component ``hardware``): the attestation is then
contraindicated and no token, so no session, exists.
"""

from __future__ import annotations

from sandboxsec.errors import VerificationError

__all__ = [
    "SessionKeyAlgorithmRefusedError",
    "SessionKeyAttributesInvalidError",
    "SessionKeyCertifyMagicInvalidError",
    "SessionKeyCertifyMalformedError",
    "SessionKeyCertifyNameMismatchError",
    "SessionKeyCertifyNonceMismatchError",
    "SessionKeyCertifySignatureInvalidError",
    "SessionKeyCertifyTypeInvalidError",
    "SessionKeyError",
    "SessionKeyPublicMalformedError",
]


class SessionKeyError(VerificationError):
    """The session key or its certification does not verify."""

    code = "session_key_invalid"


class SessionKeyPublicMalformedError(SessionKeyError):
    """The session key's TPM2B_PUBLIC does not parse or is not canonically marshalled."""

    code = "session_key_public_malformed"


class SessionKeyAttributesInvalidError(SessionKeyError):
    """The session key is not a non-duplicable, TPM-generated, unrestricted signing key."""

    code = "session_key_attributes_invalid"


class SessionKeyAlgorithmRefusedError(SessionKeyError):
    """The session key is not ECDSA P-256 with SHA-256, or the certify uses a refused
    algorithm."""

    code = "session_key_algorithm_refused"


class SessionKeyCertifyMalformedError(SessionKeyError):
    """The TPMS_ATTEST or TPMT_SIGNATURE of the certify does not parse."""

    code = "session_key_certify_malformed"


class SessionKeyCertifyMagicInvalidError(SessionKeyError):
    """The certify's magic is not TPM_GENERATED_VALUE."""

    code = "session_key_certify_magic_invalid"


class SessionKeyCertifyTypeInvalidError(SessionKeyError):
    """The attestation structure is not TPM_ST_ATTEST_CERTIFY."""

    code = "session_key_certify_type_invalid"


class SessionKeyCertifySignatureInvalidError(SessionKeyError):
    """The certify is not signed by the attesting AK."""

    code = "session_key_certify_signature_invalid"


class SessionKeyCertifyNonceMismatchError(SessionKeyError):
    """The certify's extraData is not this attestation's nonce."""

    code = "session_key_certify_nonce_mismatch"


class SessionKeyCertifyNameMismatchError(SessionKeyError):
    """The certified name is not the name of the session key that was sent."""

    code = "session_key_certify_name_mismatch"
