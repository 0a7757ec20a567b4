"""API key format: ``ssk_<key id>_<secret>``; only SHA-256 of the secret is ever stored.

The secret is 256 random bits, so a plain SHA-256 (no slow hash) is enough: there is nothing
to brute-force.  The key id lets the service find the row without scanning.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sandboxsec.errors import AuthenticationError

__all__ = ["ParsedKey", "generate_key", "parse_key", "secret_digest", "secret_matches"]

_KEY_RE = re.compile(r"^ssk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """The two parts of a presented key."""

    key_id: str
    secret: str


def generate_key() -> tuple[str, str, str]:
    """A new key: ``(full key, key id, secret digest)``.  Show the full key once, store the rest."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"ssk_{key_id}_{secret}", key_id, secret_digest(secret)


def parse_key(presented: str) -> ParsedKey:
    """Split a presented key or raise :class:`AuthenticationError` (no detail about why)."""
    m = _KEY_RE.match(presented.strip())
    if m is None:
        raise AuthenticationError("invalid API key")
    return ParsedKey(m.group(1), m.group(2))


def secret_digest(secret: str) -> str:
    """Hex SHA-256 of the secret part."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, stored_digest: str) -> bool:
    """Constant-time comparison of a presented secret with the stored digest."""
    return hmac.compare_digest(secret_digest(secret), stored_digest)
