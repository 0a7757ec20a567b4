"""Server-provided nonces of session proofs (RFC 9449 section 8): stateless and MAC'd.

With ``SANDBOXSEC_DPOP_REQUIRE_NONCE`` on, every proof must carry a ``nonce`` claim that this
service handed out in a ``DPoP-Nonce`` response header, so a proof cannot be made ahead of
time by a sandbox whose clock is wrong or was briefly someone else's: freshness is measured
on the server's clock, not on the ``iat`` the client writes.

A nonce is ``base64url(t || mac)`` (24 bytes, 32 characters): ``t`` the issue time in Unix
seconds as 8 bytes big-endian, ``mac`` the first 16 bytes of
``HMAC-SHA256(key, "sandboxsec dpop-nonce v1" || 0x00 || t)``.  Nothing is stored: any worker
holding the key checks any worker's nonce.  Clients treat the value as opaque.

Checks of :meth:`DpopNonces.check`, in order:

1. present (else ``use_dpop_nonce``: the answer carries a fresh one);
2. 32 characters of unpadded base64url whose MAC verifies (else ``dpop_nonce_invalid``: a
   nonce this service never made; the answer still carries a fresh one);
3. issued at most ``lifetime`` seconds ago and not after ``now`` + ``skew`` (else
   ``use_dpop_nonce``).

Pure: the key and ``now`` are passed in.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime
from typing import Final

from sandboxsec.attestation.jwk import b64url
from sandboxsec.encoding import b64url_decode_strict
from sandboxsec.sessions.errors import DpopNonceInvalidError, DpopNonceRequiredError

__all__ = ["NONCE_CHARS", "DpopNonces"]

_INFO: Final = b"sandboxsec dpop-nonce v1\x00"
_MAC_BYTES: Final = 16
#: The length of every nonce this service issues.
NONCE_CHARS: Final = 32


class DpopNonces:
    """Issues and checks the ``DPoP-Nonce`` values of one deployment (one shared key)."""

    def __init__(self, key: bytes, *, lifetime_seconds: int, skew_seconds: int) -> None:
        if len(key) < 32:
            raise ValueError("the nonce key must be at least 32 bytes")
        self._key = key
        self._lifetime = lifetime_seconds
        self._skew = skew_seconds

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._key, _INFO + stamp, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, now: datetime) -> str:
        """A nonce valid from ``now`` for the configured lifetime."""
        stamp = int(now.timestamp()).to_bytes(8, "big")
        return b64url(stamp + self._mac(stamp))

    def check(self, nonce: str | None, now: datetime) -> None:
        """Checks 1-3 (module docstring); the errors carry a fresh nonce for the answer."""
        # 1. Present.
        if nonce is None:
            raise DpopNonceRequiredError("the proof must carry a nonce from DPoP-Nonce",
                                         nonce=self.issue(now))
        # 2. Ours.
        raw = b""
        if len(nonce) == NONCE_CHARS:
            try:
                raw = b64url_decode_strict(nonce)
            except ValueError:
                raw = b""
        if len(raw) != 8 + _MAC_BYTES or not hmac.compare_digest(raw[8:], self._mac(raw[:8])):
            raise DpopNonceInvalidError("the proof's nonce was not issued by this service",
                                        nonce=self.issue(now))
        # 3. Fresh, on the server's clock.
        issued = int.from_bytes(raw[:8], "big")
        t = int(now.timestamp())
        if issued < t - self._lifetime or issued > t + self._skew:
            raise DpopNonceRequiredError("the proof's nonce has expired: use the new one",
                                         nonce=self.issue(now))
