"""Random identifiers: a short type prefix and 128 random bits, so ids cannot be guessed."""

from __future__ import annotations

import secrets

__all__ = ["new_id"]


def new_id(prefix: str) -> str:
    """``<prefix>_<32 hex chars>``."""
    return f"{prefix}_{secrets.token_hex(16)}"
