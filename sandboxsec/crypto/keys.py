"""Root-key providers: the only code that touches the root key.

A provider wraps and unwraps tenant key-encryption keys (KEKs) under the root key.  Two exist:

* :class:`LocalKeyProvider`: a 32-byte key file under ``$SANDBOXSEC_HOME`` (mode 0600,
  created on first use).  The file is read on every call, so a missing or unreadable file
  fails closed at once.
* :class:`Pkcs11KeyProvider`: an AES-256 key inside an HSM reached through PKCS#11.  The key is
  generated in the token as sensitive and non-extractable; wrapping and unwrapping run inside
  the HSM (``CKM_AES_GCM``), so the root key never leaves it.

Every provider failure (file missing, module unloadable, token removed, wrong PIN) is
:class:`KeyProviderUnavailableError` (503); a wrapped key that does not authenticate is
:class:`DecryptionFailedError`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sandboxsec.crypto.envelope import KEY_BYTES, unwrap_secret, wrap_secret
from sandboxsec.crypto.errors import DecryptionFailedError, KeyProviderUnavailableError
from sandboxsec.crypto.hsm_objects import CreationLock, default_lock_dir, find_or_create_secret_keys
from sandboxsec.statefiles import create_once

__all__ = [
    "KeyProvider",
    "LocalKeyProvider",
    "Pkcs11KeyProvider",
    "build_key_provider",
    "gcm",
    "gcm_open_any",
]

_NONCE_BYTES = 12
_TAG_BITS = 128
_WRAP_FORMAT_HSM = 0x02
#: Tries at opening the token before the provider reports it unavailable.
_OPEN_ATTEMPTS = 4

T = TypeVar("T")


def gcm(key: Any, fn: str, data: bytes, nonce: bytes, aad: bytes) -> bytes:
    """``CKM_AES_GCM`` encrypt or decrypt (``fn``) with a PKCS#11 AES key object."""
    from pkcs11 import GCMParams, Mechanism

    out: bytes = getattr(key, fn)(
        data, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, _TAG_BITS)
    )
    return out


def gcm_open_any(keys: list[Any], data: bytes, nonce: bytes, aad: bytes) -> bytes:
    """Decrypt with the first of ``keys`` (duplicates under one label, in their deterministic
    order) whose GCM tag verifies.  The last key's PKCS#11 error is raised as is, for the
    caller to map (a failed tag, or a lost token)."""
    import pkcs11

    for key in keys[:-1]:
        try:
            return gcm(key, "decrypt", data, nonce, aad)
        except (pkcs11.exceptions.EncryptedDataInvalid, pkcs11.exceptions.EncryptedDataLenRange,
                pkcs11.exceptions.GeneralError):
            continue  # not this one (SoftHSM reports a failed tag as a general error)
    return gcm(keys[-1], "decrypt", data, nonce, aad)


class KeyProvider(Protocol):
    """Holds the root key; wraps and unwraps tenant KEKs with it.

    ``provider_id`` names the root key (never derived from secret material in a way that
    helps an attacker); it is stored with every wrapped KEK so a KEK wrapped by another root
    is recognised instead of failing as corrupt.
    """

    @property
    def provider_id(self) -> str: ...

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        """Encrypt ``secret`` under the root key, binding ``aad``."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """Decrypt what :meth:`wrap` returned for the same ``aad``."""
        ...

    def check(self) -> None:
        """Raise :class:`KeyProviderUnavailableError` unless the root key is usable now."""
        ...

    def has_root_key(self) -> bool:
        """Whether the root key exists yet (:meth:`wrap` makes it on first use; nothing else
        does).  Raises :class:`KeyProviderUnavailableError` if the provider cannot answer."""
        ...

    def close(self) -> None: ...


class LocalKeyProvider:
    """A root key in a file (``root.key`` under the home directory), for embedded use."""

    FILE_NAME = "root.key"

    def __init__(self, home: Path, *, create: bool = True) -> None:
        self._path = Path(home) / self.FILE_NAME
        self._create = create
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def provider_id(self) -> str:
        # A hash of a 256-bit random key reveals nothing about it and pins the exact key.
        digest = hashlib.sha256(b"sandboxsec/v1/root-key-id\x00" + self._read()).hexdigest()
        return f"local:{digest[:16]}"

    def _read(self, *, create: bool = False) -> bytes:
        with self._lock:
            if create and self._create and not self._path.exists():
                self._generate()
            try:
                fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError as exc:
                raise KeyProviderUnavailableError(
                    f"root key file {self._path} cannot be opened ({exc.strerror})"
                ) from None
            try:
                info = os.fstat(fd)
                if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                    raise KeyProviderUnavailableError(
                        f"root key file {self._path} is accessible to other users; "
                        "it must be mode 0600"
                    )
                key = os.read(fd, KEY_BYTES + 1)
            except OSError as exc:
                raise KeyProviderUnavailableError(
                    f"root key file {self._path} cannot be read ({exc.strerror})"
                ) from None
            finally:
                os.close(fd)
        if len(key) != KEY_BYTES:
            raise KeyProviderUnavailableError(
                f"root key file {self._path} is not a {KEY_BYTES}-byte key"
            )
        return key

    def _generate(self) -> None:
        # Atomic and race-free: of two processes starting at once only one key wins.
        try:
            create_once(self._path, os.urandom(KEY_BYTES))
        except OSError as exc:
            raise KeyProviderUnavailableError(
                f"root key file {self._path} cannot be created ({exc.strerror})"
            ) from None

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        return wrap_secret(self._read(create=True), secret, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        return unwrap_secret(self._read(), wrapped, aad)

    def check(self) -> None:
        self._read()

    def has_root_key(self) -> bool:
        return self._path.exists()

    def close(self) -> None:
        return None


class Pkcs11KeyProvider:
    """A root key inside an HSM, used through PKCS#11 (tested with SoftHSM2).

    One logged-in session is kept open and shared under a lock.  After any PKCS#11 failure
    the session is dropped and the library re-initialised on the next call, so the provider
    recovers when the token comes back.

    Key objects are made on first use under a lock file in ``lock_dir`` shared by every
    process of the host (the workers of one server), so two processes never both make the
    same key; duplicates made anyway are used in one deterministic order
    (:mod:`sandboxsec.crypto.hsm_objects`).
    """

    def __init__(
        self,
        module: str,
        token_label: str,
        pin: str,
        key_label: str = "sandboxsec-root",
        *,
        create_key: bool = True,
        lock_dir: Path | None = None,
    ) -> None:
        self._module = module
        self._token_label = token_label
        self._pin = pin
        self._key_label = key_label
        self._create_key = create_key
        self._lock_dir = lock_dir
        self._creation_lock: CreationLock | None = None
        self._lock = threading.RLock()
        self._lib: Any = None
        self._session: Any = None
        self._keys: list[Any] = []
        self._needs_reinit = False

    @property
    def provider_id(self) -> str:
        return f"pkcs11:{self._token_label}/{self._key_label}"

    @property
    def key_label(self) -> str:
        """The root key's label (tenant keys are labelled under it)."""
        return self._key_label

    def _unavailable(self, exc: BaseException) -> KeyProviderUnavailableError:
        self._drop()
        self._needs_reinit = True
        detail = type(exc).__name__
        return KeyProviderUnavailableError(
            f"HSM token {self._token_label!r} via {self._module} is unavailable ({detail})"
        )

    def unavailable(self, exc: BaseException) -> KeyProviderUnavailableError:
        """The error for a failed HSM operation; drops the session for a later reconnect."""
        return self._unavailable(exc)

    def _drop(self) -> None:
        session, self._session, self._keys = self._session, None, []
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: S110 - the session is being discarded anyway
                pass

    def _ensure_session(self) -> Any:
        """The logged-in session, opening the library and token as needed."""
        import pkcs11

        if self._session is not None:
            return self._session
        if self._lib is None:
            self._lib = pkcs11.lib(self._module)
        elif self._needs_reinit:
            self._lib.reinitialize()
        self._needs_reinit = False
        for attempt in range(_OPEN_ATTEMPTS):
            try:
                self._session = self._open_session()
                break
            except (pkcs11.exceptions.GeneralError, pkcs11.exceptions.NoSuchToken):
                # A file-backed token being rewritten by another process (several workers
                # opening it at once, or a token just re-inserted) reads as absent or broken
                # for a moment; a token that is really gone still fails after the retries.
                if attempt == _OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))
                self._lib.reinitialize()
        return self._session

    def _open_session(self) -> Any:
        import pkcs11

        token = self._lib.get_token(token_label=self._token_label)
        try:
            return token.open(rw=True, user_pin=self._pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            # PKCS#11 logs in per application: another session of this process already did.
            return token.open(rw=True)

    @property
    def creation_lock(self) -> CreationLock:
        """The lock every find-or-create of a key object in this token runs under."""
        if self._creation_lock is None:
            directory = self._lock_dir if self._lock_dir is not None else default_lock_dir()
            self._creation_lock = CreationLock(directory, self._module, self._token_label)
        return self._creation_lock

    def _generate_root(self) -> Any:
        from pkcs11 import Attribute, KeyType

        return self._session.generate_key(
            KeyType.AES,
            KEY_BYTES * 8,
            label=self._key_label,
            store=True,
            template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.TOKEN: True,
            },
        )

    def _root_keys(self, *, create: bool = False, refresh: bool = False) -> list[Any]:
        """The root key objects, the one to wrap with first (several only if duplicates were
        made, see :mod:`sandboxsec.crypto.hsm_objects`); ``pkcs11.NoSuchKey`` if none."""
        import pkcs11

        if self._keys and not refresh:
            return self._keys
        self._ensure_session()
        maker = self._generate_root if create and self._create_key else None
        keys = find_or_create_secret_keys(self._session, self._key_label, self.creation_lock,
                                          maker)
        if not keys:
            raise pkcs11.NoSuchKey(f"no key labelled {self._key_label!r}")
        self._keys = keys
        return keys

    def _root_key(self, *, create: bool = False) -> Any:
        """The root key to wrap with, opening the library, token and session as needed."""
        return self._root_keys(create=create)[0]

    def root_key_handle(self, *, create: bool = False) -> Any:
        """The root key object (made if ``create``); call inside :meth:`run` only."""
        return self._root_key(create=create)

    def _open(self, data: bytes, nonce: bytes, aad: bytes) -> bytes:
        import pkcs11

        cached = bool(self._keys)
        keys = self._root_keys()
        try:
            return gcm_open_any(keys, data, nonce, aad)
        except (pkcs11.exceptions.EncryptedDataInvalid, pkcs11.exceptions.GeneralError):
            if not cached:
                raise
            # Another host may have added a duplicate since the keys were cached: look again
            # once, and try what is new.
            fresh = self._root_keys(refresh=True)
            if len(fresh) <= len(keys):
                raise
            return gcm_open_any(fresh, data, nonce, aad)

    def _call(self, fn: str, data: bytes, nonce: bytes, aad: bytes) -> bytes:
        import pkcs11

        def op(_session: Any) -> bytes:
            if fn == "decrypt":
                return self._open(data, nonce, aad)
            return gcm(self._root_key(create=True), fn, data, nonce, aad)

        try:
            return self.run(op, decrypting=fn == "decrypt")
        except pkcs11.NoSuchKey as exc:
            with self._lock:
                raise self._unavailable(exc) from None

    def run(self, op: Callable[[Any], T], *, decrypting: bool = False) -> T:
        """Run ``op(session)`` on the logged-in session under the provider's lock.

        PKCS#11 failures map as for the root key: a failed GCM tag (when ``decrypting``) is
        :class:`DecryptionFailedError`, anything else :class:`KeyProviderUnavailableError`.
        ``pkcs11.NoSuchKey`` is passed through for the caller to interpret.
        """
        import pkcs11

        with self._lock:
            try:
                return op(self._ensure_session())
            except pkcs11.NoSuchKey:
                raise
            except (
                pkcs11.exceptions.EncryptedDataInvalid,
                pkcs11.exceptions.EncryptedDataLenRange,
            ):
                raise DecryptionFailedError() from None
            except pkcs11.exceptions.GeneralError as exc:
                # SoftHSM reports a failed GCM tag as a general error; so does a lost token.
                if decrypting and self._token_present():
                    raise DecryptionFailedError() from None
                raise self._unavailable(exc) from None
            except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:
                raise self._unavailable(exc) from None

    def _token_present(self) -> bool:
        try:
            self._lib.get_token(token_label=self._token_label)
        except Exception:
            return False
        return True

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return bytes([_WRAP_FORMAT_HSM]) + nonce + self._call("encrypt", secret, nonce, aad)

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < 1 + _NONCE_BYTES + _TAG_BITS // 8 or wrapped[0] != _WRAP_FORMAT_HSM:
            raise DecryptionFailedError()
        return self._call("decrypt", wrapped[1 + _NONCE_BYTES :], wrapped[1:13], aad)

    def check(self) -> None:
        if not self.has_root_key():
            raise KeyProviderUnavailableError(
                f"HSM token {self._token_label!r} has no key {self._key_label!r}"
            )
        # A cached key handle outlives a removed token; only a real operation inside the HSM
        # proves the key is usable now.
        self._call("encrypt", bytes(16), os.urandom(12), b"sandboxsec/v1/health")

    def has_root_key(self) -> bool:
        import pkcs11

        with self._lock:
            try:
                self._root_key()
            except pkcs11.NoSuchKey:
                self._drop()
                return False
            except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:
                raise self._unavailable(exc) from None
            return True

    def close(self) -> None:
        with self._lock:
            self._drop()


def build_key_provider(settings: Any) -> KeyProvider:
    """The provider the settings select: ``local`` (default) or ``pkcs11``."""
    kind = str(getattr(settings, "key_provider", "local")).lower()
    if kind == "local":
        return LocalKeyProvider(Path(settings.home))
    if kind == "pkcs11":
        pin = getattr(settings, "pkcs11_pin", None)
        if pin is not None and hasattr(pin, "get_secret_value"):
            pin = pin.get_secret_value()
        module = getattr(settings, "pkcs11_module", None)
        token = getattr(settings, "pkcs11_token_label", None)
        if not module or not token or pin is None:
            raise KeyProviderUnavailableError(
                "the pkcs11 key provider needs SANDBOXSEC_PKCS11_MODULE, "
                "SANDBOXSEC_PKCS11_TOKEN_LABEL and SANDBOXSEC_PKCS11_PIN"
            )
        return Pkcs11KeyProvider(
            str(module),
            str(token),
            str(pin),
            str(getattr(settings, "pkcs11_key_label", None) or "sandboxsec-root"),
            # The workers of one server share their home: one lock for their key creation.
            lock_dir=Path(settings.home) / "locks",
        )
    raise KeyProviderUnavailableError(f"unknown key provider {kind!r} (use local or pkcs11)")
