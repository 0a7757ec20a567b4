"""Every failure leaves the API as ``{"error": {"code", "message"}}`` with a fitting status."""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandboxsec.errors import RateLimitedError, SandboxSecError
from sandboxsec.sessions.errors import DpopNonceError

__all__ = ["ERROR_RESPONSES", "ErrorDetail", "ErrorResponse", "error_body",
           "install_error_handlers"]


class ErrorDetail(BaseModel):
    """A reason code (stable, listed in docs/errors.md) and a human message."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


#: Documented in the OpenAPI description of every ``/v1`` route.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Malformed input (`invalid_input`, `json_too_deep`, …)"),
        (401, "Missing or invalid API key (`api_key_invalid`)"),
        (403, "The key's role may not do this (`forbidden`)"),
        (404, "No such object for this tenant (`not_found`)"),
        (409, "State conflict"),
        (413, "Too large (`payload_too_large`)"),
        (429, "Too many requests with this key (`rate_limited`; see `Retry-After`)"),
        (422, "A verification said no"),
        (503, "A dependency is down; nothing was allowed (fail closed)"),
    )
}

log = structlog.get_logger("sandboxsec.api")

_HTTP_CODES = {
    400: "invalid_input",
    401: "api_key_invalid",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    429: "rate_limited",
}


def error_body(code: str, message: str) -> dict[str, Any]:
    """The error document the API returns."""
    return {"error": {"code": code, "message": message}}


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        # Never echo the offending input back: it may be a secret.
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Map project errors, validation errors, HTTP errors and crashes to the error document."""

    @app.exception_handler(SandboxSecError)
    async def _sandboxsec(_request: Request, exc: SandboxSecError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("dependency_failure", code=exc.reason, error=exc.message)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if isinstance(exc, RateLimitedError):
            headers = {"Retry-After": str(exc.retry_after)}
        if isinstance(exc, DpopNonceError):  # RFC 9449 section 9: retry with this nonce
            headers = {"DPoP-Nonce": exc.nonce,
                       "WWW-Authenticate": 'DPoP error="use_dpop_nonce", algs="ES256"'}
        return JSONResponse(error_body(exc.reason, exc.message), exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_input", _describe_validation(exc)), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return JSONResponse(error_body(code, message), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(DataError)
    @app.exception_handler(OverflowError)
    async def _out_of_range(_request: Request, exc: Exception) -> JSONResponse:
        # A value the database cannot hold (a huge integer, say) is the caller's input error.
        log.info("value_out_of_range", error_type=type(exc).__name__)
        return JSONResponse(error_body("invalid_input", "a value is out of range"), 400)

    @app.exception_handler(OperationalError)
    async def _db_down(_request: Request, exc: Exception) -> JSONResponse:
        log.warning("database_unavailable", error_type=type(exc).__name__)
        return JSONResponse(error_body("database_unavailable",
                                       "the database is unavailable; nothing was done"), 503,
                            headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", exc_info=exc)
        return JSONResponse(error_body("internal_error", "internal error"), 500)
