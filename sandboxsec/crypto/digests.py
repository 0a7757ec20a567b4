"""Keyed digests: what stands in for plain SHA-256 wherever a digest reaches storage or exports.

A plain SHA-256 of a short secret (a PIN, an IBAN from a list) is brute-forced offline in
moments, so nothing stored or exported is an unkeyed hash of tenant content.  Each tenant has
a *digest key* derived from its key hierarchy::

    digest key = HKDF-SHA256(KEK version 1, salt = tenant id, info = "sandboxsec/v1/digest")

so it is as safe as the tenant's keys and is destroyed with them by crypto-shredding: after
``tenant delete`` no one, the service included, can confirm a guess against a stored digest.
Digests are HMAC-SHA256 under that key with a one-byte domain label, so a content digest can
never be replayed as a params digest:

* ``content_hmac``: ``HMAC(digest key, 0x01 || plaintext)``, hex;
* ``params_hmac``:  ``HMAC(digest key, 0x02 || params_hash)``, hex, where ``params_hash`` is
  the plain SHA-256 of the canonical params (what a person compares and what a grant binds;
  it stays in memory and in the approval and grant flow, never in the audit log).

This module is pure: keys and bytes in, hex strings out.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["ContentHasher", "content_hmac", "derive_digest_key", "params_hmac"]

_INFO = b"sandboxsec/v1/digest"
_CONTENT = b"\x01"
_PARAMS = b"\x02"


def derive_digest_key(kek_v1: bytes, tenant_id: str) -> bytes:
    """The tenant's 32-byte digest key from its first KEK."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=tenant_id.encode(), info=_INFO
    ).derive(kek_v1)


class ContentHasher:
    """Incremental ``content_hmac`` (for streams)."""

    def __init__(self, key: bytes) -> None:
        self._mac = hmac.new(key, _CONTENT, hashlib.sha256)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._mac.update(data)

    def hexdigest(self) -> str:
        return self._mac.hexdigest()


def content_hmac(key: bytes, data: bytes | bytearray | memoryview) -> str:
    """The keyed digest of a record's plaintext."""
    h = ContentHasher(key)
    h.update(data)
    return h.hexdigest()


def params_hmac(key: bytes, params_hash: str) -> str:
    """The keyed digest of a params hash (the plain one stays out of storage and exports)."""
    return hmac.new(key, _PARAMS + params_hash.encode("ascii"), hashlib.sha256).hexdigest()
