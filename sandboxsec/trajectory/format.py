"""The trajectory record format, pure: record kinds and the context bound into ciphertexts."""

from __future__ import annotations

import functools
import re

from sandboxsec.crypto.envelope import encode_context
from sandboxsec.crypto.errors import TrajectoryKindInvalidError

__all__ = ["check_kind", "record_context"]

_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_CONTEXT_LABEL = "sandboxsec/trajectory/v1"


@functools.lru_cache(maxsize=4096)
def _context_prefix(tenant_id: str, session_id: str, part: str, kind: str) -> bytes:
    return encode_context(_CONTEXT_LABEL, tenant_id, session_id, part, kind)


def record_context(tenant_id: str, session_id: str, record_id: str, part: str, kind: str) -> bytes:
    """The associated data binding a ciphertext to its tenant, session, part, kind and record:
    ``encode_context(label, tenant, session, part, kind, record)`` (the prefix is cached)."""
    raw = record_id.encode()
    return _context_prefix(tenant_id, session_id, part, kind) + len(raw).to_bytes(4, "big") + raw


def check_kind(kind: str) -> str:
    """Validate a record kind (it is stored in clear and bound into the ciphertext)."""
    if not _KIND.match(kind):
        raise TrajectoryKindInvalidError()
    return kind
