"""Operational logs: structlog, JSON lines, with secrets redacted before they are rendered.

structlog has no redaction of its own.  :func:`redact` runs last before the renderer and
replaces (a) values under sensitive key names, whatever their type, and (b) anything inside
any string that looks like an API key, a bearer token, a JWT or PEM key material.  Tracebacks
are rendered without local variables so a key held in a local never reaches the log.
"""

from __future__ import annotations

import logging
import logging.config
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

__all__ = [
    "REDACTED",
    "configure_logging",
    "get_logger",
    "redact",
    "redact_text",
    "standalone_logger",
    "stdlib_logging_config",
]

REDACTED = "[redacted]"

_SENSITIVE_KEY = re.compile(
    r"(pass(word|phrase)?|secret|token|api[_-]?key|authorization|cookie|private|"
    r"^key$|_key$|key_material|pin$|grant$|credential|nonce|signature|ciphertext|plaintext|"
    r"^data$|email|phone|payee|card|iban|account)",
    re.IGNORECASE,
)
_SECRET_PATTERNS = [
    re.compile(r"ssk_[A-Za-z0-9_\-]{8,}"),  # our API keys
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=\-]+"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*"),  # JWT / JWS
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    re.compile(r"sgr_[A-Za-z0-9_.\-]{8,}"),  # grants
]


def redact_text(text: str) -> str:
    """Replace every secret-looking substring of ``text``."""
    for pat in _SECRET_PATTERNS:
        text = pat.sub(REDACTED, text)
    return text


def _redact_value(key: str | None, value: Any, depth: int = 0) -> Any:
    if key is not None and _SENSITIVE_KEY.search(key) and key not in _SAFE_KEYS:
        return REDACTED
    if depth > 8:
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return REDACTED
    if isinstance(value, Mapping):
        return {str(k): _redact_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(None, v, depth + 1) for v in value]
    return value


# Field names that match the pattern above but carry no secret.
_SAFE_KEYS = frozenset({"key_id", "event", "token_status", "level", "logger", "tenant_key_version"})


def redact(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: redact sensitive fields and secret-looking strings."""
    return {k: _redact_value(k, v) for k, v in event_dict.items()}


def _renderer(fmt: str) -> Any:
    if fmt == "console":
        return structlog.dev.ConsoleRenderer(colors=False)
    return structlog.processors.JSONRenderer()


def _exceptions() -> Any:
    return structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )


def stdlib_logging_config(level: str = "info", fmt: str = "json") -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` that renders every standard-library record (the
    server's own ``uvicorn`` messages, SQLAlchemy, alembic, ...) the way structlog renders
    ours: one stream of JSON lines on stderr, with the same redaction."""
    formatter = {
        "()": structlog.stdlib.ProcessorFormatter,
        "foreign_pre_chain": [
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        "processors": [
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _exceptions(),
            redact,
            _renderer(fmt),
        ],
    }
    handler = {"class": "logging.StreamHandler", "formatter": "sandboxsec",
               "stream": "ext://sys.stderr"}
    lvl = level.upper()
    # Libraries log every HTTP call or connection at INFO; only their warnings and errors are
    # the service's business (as before this configuration, when Python dropped the rest).
    named = logging.getLevelName(lvl)
    number = named if isinstance(named, int) else logging.INFO
    root = logging.getLevelName(max(logging.WARNING, number))
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sandboxsec": formatter},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": root},
        # The server's loggers come with handlers of their own: replace them by ours.  Its
        # per-request access lines stay off, as `serve` always had them (access_log=False).
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.error": {"handlers": ["stderr"], "level": lvl, "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def _processors(fmt: str) -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _exceptions(),
        redact,
        _renderer(fmt),
    ]


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger) for JSON output with redaction."""
    out = stream or sys.stderr
    structlog.configure(
        processors=_processors(fmt),
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    if stream is None:
        # Records of libraries and of the server go to the same stream, rendered the same way.
        logging.config.dictConfig(stdlib_logging_config(level, fmt))


def standalone_logger(name: str, fmt: str = "json", stream: TextIO | None = None) -> Any:
    """A logger that renders as :func:`configure_logging` would, without touching the global
    configuration (``serve`` before its workers start, inside a process that may be a test)."""
    return structlog.wrap_logger(
        structlog.PrintLogger(stream or sys.stderr), processors=_processors(fmt),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    ).bind(logger=name)


def get_logger(name: str) -> Any:
    """A bound structlog logger named ``name``."""
    return structlog.get_logger(name)
