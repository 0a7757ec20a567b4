"""Reason codes of session proofs (DPoP) and of the session lifecycle.

Each class carries one stable reason code, documented in ``docs/attestation.md`` and
``docs/errors.md``.  Proof failures are 401 (the request is not authenticated as coming from
the session's sandbox) except malformed proofs (400); an ended or expired session is 409.
"""

from __future__ import annotations

from sandboxsec.errors import (
    AuthenticationError,
    ConflictError,
    DependencyUnavailableError,
    InputError,
    VerificationError,
)

__all__ = [
    "DpopAthMismatchError",
    "DpopBodyMismatchError",
    "DpopError",
    "DpopKeyMismatchError",
    "DpopMalformedError",
    "DpopMethodMismatchError",
    "DpopMissingError",
    "DpopNonceError",
    "DpopNonceInvalidError",
    "DpopNonceKeyUnavailableError",
    "DpopNonceRequiredError",
    "DpopReplayStoreUnavailableError",
    "DpopReplayedError",
    "DpopSessionMismatchError",
    "DpopSignatureInvalidError",
    "DpopStaleError",
    "DpopUrlMismatchError",
    "DpopUrlUnconfiguredError",
    "SessionEndedError",
    "SessionExpiredError",
    "SessionKeyRequiredError",
    "SessionNotBoundError",
]


class DpopError(AuthenticationError):
    """The session proof does not prove that the request comes from the session's key."""

    code = "dpop_invalid"
    status = 401


class DpopMissingError(DpopError):
    """A session-scoped request carried no ``DPoP`` proof."""

    code = "dpop_proof_missing"


class DpopMalformedError(InputError):
    """The ``DPoP`` header is not one well-formed proof (encoding, header, claims, size)."""

    code = "dpop_proof_malformed"


class DpopSignatureInvalidError(DpopError):
    """The proof's signature does not verify under the key in its header."""

    code = "dpop_signature_invalid"


class DpopKeyMismatchError(DpopError):
    """The proof is signed by a key other than the session's TPM-held key."""

    code = "dpop_key_mismatch"


class DpopMethodMismatchError(DpopError):
    """The proof was made for another HTTP method."""

    code = "dpop_method_mismatch"


class DpopUrlMismatchError(DpopError):
    """The proof was made for another URL."""

    code = "dpop_url_mismatch"


class DpopBodyMismatchError(DpopError):
    """The proof's body hash is not the hash of the body received."""

    code = "dpop_body_mismatch"


class DpopSessionMismatchError(DpopError):
    """The proof was made for another session than the one the request acts in."""

    code = "dpop_session_mismatch"


class DpopAthMismatchError(DpopError):
    """The proof was made for another API key (``ath``)."""

    code = "dpop_ath_mismatch"


class DpopStaleError(DpopError):
    """The proof's ``iat`` is outside the freshness window."""

    code = "dpop_stale"


class DpopReplayedError(DpopError):
    """This proof (its key and ``jti``) was already used."""

    code = "dpop_replayed"


class DpopNonceError(DpopError):
    """The proof's server nonce is missing, expired or forged; ``nonce`` is a fresh one, sent
    back in the ``DPoP-Nonce`` header with ``WWW-Authenticate: DPoP error="use_dpop_nonce"``
    (RFC 9449 section 9), so a client retries once with it."""

    code = "use_dpop_nonce"

    def __init__(self, message: str = "", *, nonce: str) -> None:
        super().__init__(message)
        self.nonce = nonce


class DpopNonceRequiredError(DpopNonceError):
    """The proof carries no server nonce, or one that expired (RFC 9449 ``use_dpop_nonce``)."""

    code = "use_dpop_nonce"


class DpopNonceInvalidError(DpopNonceError):
    """The proof's nonce was not issued by this service (its MAC does not verify)."""

    code = "dpop_nonce_invalid"


class DpopReplayStoreUnavailableError(DependencyUnavailableError):
    """The replay store cannot record the proof: the request is refused (fail closed)."""

    code = "dpop_replay_store_unavailable"


class DpopNonceKeyUnavailableError(DependencyUnavailableError):
    """The key of the server nonces cannot be read or created: nothing is served unchecked."""

    code = "dpop_nonce_key_unavailable"


class DpopUrlUnconfiguredError(DependencyUnavailableError):
    """No external URL is configured, so a proof's URL cannot be checked (fail closed)."""

    code = "dpop_url_unconfigured"


class SessionNotBoundError(DpopError):
    """The session has no TPM-held session key, so no request can act in it."""

    code = "session_not_bound"
    status = 403


class SessionKeyRequiredError(VerificationError):
    """The attestation token carries no certified session key (``cnf.jkt``)."""

    code = "session_key_required"


class SessionEndedError(ConflictError):
    """The session was ended: nothing more happens in it."""

    code = "session_ended"


class SessionExpiredError(ConflictError):
    """The session expired: nothing more happens in it."""

    code = "session_expired"
