"""Proof signatures checked while the request goes on.

``cryptography`` holds the GIL while it verifies an ECDSA signature, so a proof's signature
check (about a tenth of a millisecond, twice that with cold caches) would add its whole time
to every proven action.  Where the optional native module ``sandboxsec.sessions._p256`` is
built (the same OpenSSL EVP call, on a thread of its own, without the GIL),
:meth:`SignatureChecks.start` starts the check and the request goes on; the action's
transaction waits for the answer before it commits (:meth:`sandboxsec.sessions.binding.
SessionBinding.acting`), so nothing a forged proof asks for is ever committed.

The signature is checked before anything else, with ``cryptography``, when:

* the native module is not built (or ``native=False``);
* a proof of the key failed its signature before, in this process (a *suspect* key): a
  forger gets one decision computed and rolled back, not one per forged proof (until the
  key drops out of the bounded cache of keys).

Either way the answer is the same bool; the module is differential-tested against
``cryptography`` (``tests/unit/sessions/test_p256_native.py``).
"""

from __future__ import annotations

import importlib
from typing import Any, Final, Protocol, cast

from sandboxsec.sessions import dpop
from sandboxsec.sessions.errors import DpopSignatureInvalidError
from sandboxsec.sessions.lru import Lru

__all__ = ["PendingSignature", "SignatureChecks", "implementation"]

#: Marks a key whose proofs are checked before acting (one failed its signature).
_SUSPECT: Final = object()


class _Pending(Protocol):
    def result(self) -> bool: ...


class _NativeKey(Protocol):
    def start(self, signature: bytes, message: bytes) -> _Pending: ...


def _load_native() -> Any | None:
    # By name: the import contracts see only Python modules (as sandboxsec.audit.verify).
    try:
        return importlib.import_module("sandboxsec.sessions._p256")
    except ImportError:
        return None


_native = _load_native()


def implementation() -> str:
    """``native`` when signature checks can run beside the request, else ``cryptography``."""
    return "native" if _native is not None else "cryptography"


class PendingSignature:
    """A proof's signature check, running or done; :meth:`require` before acting."""

    __slots__ = ("_checks", "_ok", "_running", "_signature")

    def __init__(self, checks: SignatureChecks, signature: dpop.ProofSignature,
                 running: _Pending | None, ok: bool | None) -> None:
        self._checks = checks
        self._signature = signature
        self._running = running
        self._ok = ok

    @property
    def done(self) -> bool:
        """Whether the answer is known (checked in the caller, or already waited for)."""
        return self._ok is not None

    def valid(self) -> bool:
        """Whether the signature verifies (waits for a running check)."""
        if self._ok is None:
            assert self._running is not None
            self._ok = self._running.result()
            self._running = None
            self._checks.answered(self._signature, self._ok)
        return self._ok

    def require(self) -> None:
        """Raise :class:`DpopSignatureInvalidError` unless the signature verifies."""
        if not self.valid():
            raise DpopSignatureInvalidError("the proof signature does not verify")


class SignatureChecks:
    """Starts proof signature checks; keeps the native keys and the suspect keys."""

    def __init__(self, keys: dpop.KeyCache, *, native: bool = True, size: int = 4096) -> None:
        self._keys = keys
        self._native = _native if native else None
        # By the key's point: its native form, or _SUSPECT once one of its proofs failed.
        self._native_keys: Lru[bytes, _NativeKey | object] = Lru(size)

    @property
    def overlaps(self) -> bool:
        """Whether checks can run beside the request (the native module is in use)."""
        return self._native is not None

    def start(self, signature: dpop.ProofSignature) -> PendingSignature:
        """The check of ``signature``: started on a pool thread, or, for a suspect key or
        without the native module, already done."""
        native = self._native_key(signature)
        if native is None:
            return self.now(signature)
        return PendingSignature(self, signature,
                                native.start(signature.raw, signature.message), None)

    def now(self, signature: dpop.ProofSignature) -> PendingSignature:
        """The check of ``signature``, done in this thread (``cryptography``)."""
        ok = signature.verify()
        self.answered(signature, ok)
        return PendingSignature(self, signature, None, ok)

    def answered(self, signature: dpop.ProofSignature, ok: bool) -> None:
        """Record an answer: a verified header is kept, a failing key becomes suspect."""
        if ok:
            self._keys.verified(signature)
        elif self._native is not None:
            self._native_keys.put(signature.point, _SUSPECT)

    def _native_key(self, signature: dpop.ProofSignature) -> _NativeKey | None:
        # The key's native form, None for a suspect key or without the native module.
        if self._native is None:
            return None
        key = self._native_keys.get(signature.point)
        if key is None:
            try:
                key = self._native.PublicKey(signature.point)
            except ValueError:
                return None  # cryptography accepted the point; let it answer, here
            self._native_keys.put(signature.point, key)
        return None if key is _SUSPECT else cast(_NativeKey, key)
