"""Challenge nonces: minted without storage, authenticated, bound to a tenant and an expiry.

A nonce is ``version (1) ‖ random (15) ‖ expiry (4, seconds since the epoch, big-endian) ‖
HMAC-SHA256(key, label ‖ tenant ‖ the first 20 bytes)[:20]`` — 40 bytes, well inside the
64-byte qualifying data of TPM2_Quote.  Issuing one writes nothing; the MAC proves the
service issued it to this tenant and when it expires.  Single use is enforced where the
nonce is consumed: the service records every consumed nonce under a unique key in the
database, so a replay fails even across processes.

Contract: pure functions; ``now`` and the key are arguments.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from datetime import UTC, datetime
from typing import Final

from sandboxsec.attestation.verifier import NonceState

__all__ = ["NONCE_BYTES", "check_nonce", "mint_nonce", "nonce_expiry"]

NONCE_BYTES: Final = 40
_VERSION: Final = 1
_LABEL: Final = b"sandboxsec attestation nonce v1\x00"


def _mac(key: bytes, tenant_id: str, head: bytes) -> bytes:
    tenant = tenant_id.encode("utf-8")
    message = _LABEL + struct.pack(">H", len(tenant)) + tenant + head
    return hmac.new(key, message, hashlib.sha256).digest()[:20]


def mint_nonce(key: bytes, tenant_id: str, expires_at: datetime) -> bytes:
    """A fresh nonce for ``tenant_id`` valid until ``expires_at`` (whole seconds)."""
    head = bytes([_VERSION]) + secrets.token_bytes(15) + struct.pack(
        ">I", int(expires_at.timestamp())
    )
    return head + _mac(key, tenant_id, head)


def nonce_expiry(nonce: bytes) -> datetime:
    """The expiry written in a well-formed nonce (not authenticated by this call)."""
    return datetime.fromtimestamp(struct.unpack(">I", nonce[16:20])[0], UTC)


def check_nonce(key: bytes, tenant_id: str, nonce: bytes, now: datetime) -> NonceState:
    """``FRESH`` if this service minted ``nonce`` for ``tenant_id`` and it has not expired.

    Another tenant's nonce, a forged or altered one, or bytes of the wrong shape are all
    ``UNKNOWN``; whether it was used before is for the caller's store to say.
    """
    if len(nonce) != NONCE_BYTES or nonce[0] != _VERSION:
        return NonceState.UNKNOWN
    if not hmac.compare_digest(_mac(key, tenant_id, nonce[:20]), nonce[20:]):
        return NonceState.UNKNOWN
    if now >= nonce_expiry(nonce):
        return NonceState.EXPIRED
    return NonceState.FRESH
