"""Challenge nonces: minted without storage, authenticated, bound to a tenant and an expiry.

A nonce (format 2, the one minted) is 32 bytes, the most a TPM with only SHA-256 banks takes
as qualifying data (TPM2B_DATA is bounded by the largest digest the TPM implements)::

    kind (1) ‖ random (11) ‖ expiry (4, seconds since the epoch, big-endian)
             ‖ HMAC-SHA256(key, label ‖ tenant ‖ AK name ‖ the first 16 bytes)[:16]

``kind`` is 2 for a nonce any AK of the tenant may answer, 3 for one bound to the AK named
when it was asked for (the MAC covers that name, so another AK's quote over it is refused as
an unknown nonce).  The expiry is the issue time plus the TTL in force when it was issued.
Issuing one writes nothing; the MAC proves the service issued it to this tenant (and AK) and
when it expires.  Single use is enforced where the nonce is consumed: the service records
every consumed nonce under a unique key in the database, in the verdict's transaction, so a
replay fails even across processes.

Format 1 (40 bytes: ``1 ‖ random (15) ‖ expiry (4) ‖ MAC[:20]``) is no longer minted but still
checked, so challenges issued before an upgrade can be answered until they expire.

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

__all__ = ["MAX_QUALIFYING_DATA", "NONCE_BYTES", "check_nonce", "mint_nonce", "nonce_expiry"]

#: TPM2B_DATA on a TPM whose largest digest is SHA-256.
MAX_QUALIFYING_DATA: Final = 32
NONCE_BYTES: Final = 32
_ANY_AK: Final = 2
_ONE_AK: Final = 3
_HEAD: Final = 16
_LABEL: Final = b"sandboxsec attestation nonce v2\x00"
# Format 1, read only.
_V1: Final = 1
_V1_BYTES: Final = 40
_V1_LABEL: Final = b"sandboxsec attestation nonce v1\x00"


def _mac(key: bytes, tenant_id: str, ak_name: bytes, head: bytes) -> bytes:
    tenant = tenant_id.encode("utf-8")
    message = (_LABEL + struct.pack(">H", len(tenant)) + tenant
               + struct.pack(">H", len(ak_name)) + ak_name + head)
    return hmac.new(key, message, hashlib.sha256).digest()[: NONCE_BYTES - _HEAD]


def _mac_v1(key: bytes, tenant_id: str, head: bytes) -> bytes:
    tenant = tenant_id.encode("utf-8")
    message = _V1_LABEL + struct.pack(">H", len(tenant)) + tenant + head
    return hmac.new(key, message, hashlib.sha256).digest()[:20]


def mint_nonce(key: bytes, tenant_id: str, expires_at: datetime, *,
               ak_name: bytes | None = None) -> bytes:
    """A fresh 32-byte nonce for ``tenant_id`` valid until ``expires_at`` (whole seconds).

    With ``ak_name`` (the TPM name of a bound AK) only a quote by that AK can use it.
    """
    kind = _ONE_AK if ak_name is not None else _ANY_AK
    head = bytes([kind]) + secrets.token_bytes(11) + struct.pack(
        ">I", int(expires_at.timestamp())
    )
    return head + _mac(key, tenant_id, ak_name or b"", head)


def nonce_expiry(nonce: bytes) -> datetime:
    """The expiry written in a well-formed nonce (not authenticated by this call)."""
    offset = 16 if len(nonce) == _V1_BYTES else 12
    return datetime.fromtimestamp(struct.unpack(">I", nonce[offset:offset + 4])[0], UTC)


def check_nonce(key: bytes, tenant_id: str, nonce: bytes, now: datetime, *,
                ak_name: bytes | None = None) -> NonceState:
    """``FRESH`` if this service minted ``nonce`` for ``tenant_id`` and it has not expired.

    ``ak_name`` is the name of the AK whose quote carries the nonce; a nonce bound to an AK
    is valid only with that name.  Another tenant's nonce, another AK's, a forged or altered
    one, or bytes of the wrong shape are all ``UNKNOWN``; whether it was used before is for
    the caller's store to say.
    """
    if len(nonce) == NONCE_BYTES and nonce[0] in (_ANY_AK, _ONE_AK):
        if nonce[0] == _ONE_AK and not ak_name:
            return NonceState.UNKNOWN
        bound = ak_name or b"" if nonce[0] == _ONE_AK else b""
        expected = _mac(key, tenant_id, bound, nonce[:_HEAD])
        if not hmac.compare_digest(expected, nonce[_HEAD:]):
            return NonceState.UNKNOWN
    elif len(nonce) == _V1_BYTES and nonce[0] == _V1:
        if not hmac.compare_digest(_mac_v1(key, tenant_id, nonce[:20]), nonce[20:]):
            return NonceState.UNKNOWN
    else:
        return NonceState.UNKNOWN
    if now >= nonce_expiry(nonce):
        return NonceState.EXPIRED
    return NonceState.FRESH
