"""The key of the server nonces (:mod:`sandboxsec.sessions.nonce`), shared by every worker.

It lives in ``<home>/sessions/dpop-nonce.key`` (32 random bytes, mode 0600), created on first
use race-free across worker processes; nodes that serve one deployment share the file (or
the home) as they share the other keys under it.  Losing it only makes outstanding nonces
invalid: clients are answered with a fresh one and retry.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sandboxsec.sessions.errors import DpopNonceKeyUnavailableError
from sandboxsec.sessions.nonce import DpopNonces
from sandboxsec.statefiles import create_once

__all__ = ["dpop_nonces"]


def dpop_nonces(home: Path, lifetime_seconds: int, skew_seconds: int) -> DpopNonces:
    """The deployment's nonce issuer; fails closed when its key cannot be read or made."""
    try:
        key = create_once(home / "sessions" / "dpop-nonce.key", secrets.token_bytes(32))
    except OSError as exc:
        raise DpopNonceKeyUnavailableError(
            f"the DPoP nonce key cannot be read or created ({type(exc).__name__})") from None
    if len(key) != 32:
        raise DpopNonceKeyUnavailableError("the DPoP nonce key file is not 32 bytes")
    return DpopNonces(key, lifetime_seconds=lifetime_seconds, skew_seconds=skew_seconds)
