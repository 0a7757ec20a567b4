"""One exception per reason-code family, as the service groups them (``docs/errors.md``).

Every refusal the service sends is ``{"error": {"code", "message"}}`` with a status; the
status names the family and ``code`` the exact reason, so callers catch the family and match
on ``code`` when they care::

    try:
        client.approve(approval)
    except ConflictError as exc:       # 409: approval_not_pending, ...
        if exc.code == "approval_not_pending":
            ...

Failures that happen before an answer arrives are :class:`TransportError`s;
:class:`OutcomeUnknownError` is the one to take seriously: a non-idempotent request was sent
and the connection dropped before the answer, so it may or may not have taken effect.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ClientError",
    "ConflictError",
    "ForbiddenError",
    "InputError",
    "NotFoundError",
    "OutcomeUnknownError",
    "ParamsHashMismatchError",
    "RateLimitedError",
    "ServerError",
    "TransportError",
    "UnavailableError",
    "VerificationError",
    "error_for",
]


class ClientError(Exception):
    """Root of every error this package raises."""


class ApiError(ClientError):
    """The service answered with a refusal: HTTP ``status``, reason ``code`` and ``message``.

    ``code`` is the service's stable reason code, or ``http_<status>`` when the answer carried
    no error document (a proxy's error page, say).  ``retry_after`` is the ``Retry-After``
    header in seconds, when the service sent one.
    """

    family: ClassVar[str] = "api_error"

    def __init__(self, status: int, code: str, message: str,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InputError(ApiError):
    """400, 405, 408, 413, 415, 431: the request was malformed or too large."""

    family = "invalid_input"


class AuthenticationError(ApiError):
    """401: no valid API key (``api_key_invalid``)."""

    family = "unauthenticated"


class ForbiddenError(ApiError):
    """403: the key's role may not do this."""

    family = "forbidden"


class NotFoundError(ApiError):
    """404: no such object for this tenant (also another tenant's object)."""

    family = "not_found"


class ConflictError(ApiError):
    """409: the object's state does not allow this (``approval_not_pending``, ...)."""

    family = "conflict"


class VerificationError(ApiError):
    """422: evidence, a signature, a token or a proof did not verify (``grant_*``, ...)."""

    family = "verification_failed"


class RateLimitedError(ApiError):
    """429: too many requests; ``retry_after`` says when to come back."""

    family = "rate_limited"


class UnavailableError(ApiError):
    """503: a dependency of the service is down and nothing was done (fail closed)."""

    family = "dependency_unavailable"


class ServerError(ApiError):
    """Any other 5xx: an unexpected failure of the service."""

    family = "internal_error"


class TransportError(ClientError):
    """No answer: the connection failed or timed out (after the configured retries)."""


class OutcomeUnknownError(TransportError):
    """A request that is not safe to repeat was sent and its answer was lost.

    The service may or may not have acted on it; the client never repeats it on its own.
    Look the outcome up (the approval's state, the trajectory) before trying again.
    """


class ParamsHashMismatchError(ClientError):
    """The params shown do not hash to the ``params_hash`` the service sent: not deciding."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InputError, 405: InputError, 408: InputError, 413: InputError, 415: InputError,
    431: InputError, 401: AuthenticationError, 403: ForbiddenError, 404: NotFoundError,
    409: ConflictError, 422: VerificationError, 429: RateLimitedError, 503: UnavailableError,
}


def error_for(status: int, code: str, message: str,
              retry_after: float | None = None) -> ApiError:
    """The family exception for an answer with ``status``."""
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else InputError if status >= 400 else ApiError
    return cls(status, code, message, retry_after)
