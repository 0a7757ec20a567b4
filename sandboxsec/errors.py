"""One exception hierarchy for the whole project.

Every failure a caller can see is a :class:`SandboxSecError` with a stable, snake_case
``code`` (the *reason code*) and an HTTP ``status``.  Reason codes are stored in audit entries
and returned by the API, so they are only ever added, never renamed.  Domain modules define
their own subclasses of the families below; ``all_reason_codes()`` collects them so a test can
check that every code is documented under ``docs/``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "DependencyUnavailableError",
    "ForbiddenError",
    "HeadersTooLargeError",
    "InputError",
    "InternalError",
    "JsonDuplicateKeyError",
    "JsonTooDeepError",
    "MethodNotAllowedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RequestTimeoutError",
    "SandboxSecError",
    "VerificationError",
    "all_reason_codes",
]


class SandboxSecError(Exception):
    """Root of every error this project raises on purpose.

    ``code`` is the machine-readable reason, ``message`` a human sentence that never contains
    secrets.  Subclasses set ``code`` and ``status`` as class attributes; an instance may
    override ``code`` for a more specific reason within the same family.
    """

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip().splitlines()[0]
        if code is not None:
            self._code = code

    @property
    def reason(self) -> str:
        """The reason code of this instance (the class code unless overridden)."""
        return getattr(self, "_code", self.code)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class InputError(SandboxSecError):
    """The request is malformed or a value is out of range."""

    code = "invalid_input"
    status = 400


class PayloadTooLargeError(InputError):
    """The request or record exceeds a configured size limit."""

    code = "payload_too_large"
    status = 413


class AuthenticationError(SandboxSecError):
    """No valid API key was presented."""

    code = "unauthenticated"
    status = 401


class ForbiddenError(SandboxSecError):
    """The key is valid but its role may not do this."""

    code = "forbidden"
    status = 403


class NotFoundError(SandboxSecError):
    """No such object for this tenant (also the answer for another tenant's objects)."""

    code = "not_found"
    status = 404


class ConflictError(SandboxSecError):
    """The object is not in a state that allows this operation."""

    code = "conflict"
    status = 409


class VerificationError(SandboxSecError):
    """Evidence, a signature, a token or a proof did not verify."""

    code = "verification_failed"
    status = 422


class DependencyUnavailableError(SandboxSecError):
    """A dependency the decision needs (database, audit log, key store) failed: fail closed."""

    code = "dependency_unavailable"
    status = 503


class ConfigurationError(SandboxSecError):
    """A setting is invalid (the message names the variable); nothing was started."""

    code = "invalid_setting"
    status = 500


class RateLimitedError(SandboxSecError):
    """Too many requests with this API key; retry after ``retry_after`` seconds."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str = "", *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _subclasses(cls: type[SandboxSecError]) -> list[type[SandboxSecError]]:
    out: list[type[SandboxSecError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_subclasses(sub))
    return out


def all_reason_codes() -> dict[str, type[SandboxSecError]]:
    """Every reason code declared by a class in the hierarchy (import domain modules first)."""
    return {c.code: c for c in _subclasses(SandboxSecError)}


class JsonTooDeepError(InputError):
    """The JSON body nests deeper than the configured limit."""

    code = "json_too_deep"


class JsonDuplicateKeyError(InputError):
    """A JSON object in the body repeats a member name (parsers disagree on which one wins)."""

    code = "json_duplicate_key"


class MethodNotAllowedError(InputError):
    """The path exists but not with this HTTP method."""

    code = "method_not_allowed"
    status = 405


class InternalError(SandboxSecError):
    """An unexpected failure; details are in the operational log, never in the answer."""

    code = "internal_error"
    status = 500


class RequestTimeoutError(InputError):
    """The request head or body did not arrive within the request timeout."""

    code = "request_timeout"
    status = 408


class HeadersTooLargeError(InputError):
    """The request line and headers exceed the head size limit (64 KiB)."""

    code = "headers_too_large"
    status = 431


#: The families of refusals: the request, the caller or the object's state is at fault (4xx).
#: Everything else (``DependencyUnavailableError``, ``InternalError``, an undeclared failure)
#: is a failure of the service or of something it depends on.
REFUSAL_FAMILIES: tuple[type[SandboxSecError], ...] = (
    InputError,
    AuthenticationError,
    ForbiddenError,
    NotFoundError,
    ConflictError,
    VerificationError,
)


def is_refusal(exc: BaseException) -> bool:
    """True when ``exc`` refuses the request (audited as a refusal, answered with a 4xx).

    Domain logic asks this instead of comparing HTTP statuses: the status belongs to the API
    edge, the family to the domain.
    """
    return isinstance(exc, REFUSAL_FAMILIES)
