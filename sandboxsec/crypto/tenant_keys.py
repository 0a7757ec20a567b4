"""Per-tenant keys held by the key provider, outside the database: what shredding destroys.

Every tenant KEK is wrapped by a key that belongs to that tenant alone and never reaches the
database.  ``tenant delete`` destroys that key, so a copy of the database taken afterwards
(its files, its write-ahead log, a backup) together with the root key recovers nothing: the
wrapped KEKs are still there to be carved, but the key that opens them is gone.

Two stores exist, one per key provider:

* :class:`LocalTenantKeyStore` (``local`` provider): one file per tenant,
  ``<tenant_key_dir>/<tenant id>.key`` (directory 0700, file 0600), holding 32 random bytes
  wrapped by the root key (``AAD = ("sandboxsec/tenant-key/v1", tenant id)``).  Reading a
  tenant key needs both that file and the root key; destroying it overwrites the file with
  random bytes, syncs it, unlinks it and syncs the directory.
* :class:`Pkcs11TenantKeyStore` (``pkcs11`` provider): one AES-256 key object per tenant in
  the HSM (label ``<root label>/tenant/<tenant id>``, sensitive, not extractable); KEKs are
  wrapped inside the HSM with ``CKM_AES_GCM``; destroying it is ``C_DestroyObject``.

Wrapped KEK formats (the first byte tells them apart from KEKs wrapped by the root key alone,
formats 0x01 and 0x02, which older versions wrote)::

    0x03 | nonce (12) | AES-256-GCM(local tenant key, KEK, aad) with tag
    0x04 | nonce (12) | CKM_AES_GCM(HSM tenant key, KEK, aad) output (ct | tag)

A missing tenant key is :class:`TenantKeyMissingError`; the caller decides whether that means
"shredded" (the keyring says so) or "the key store lost it" (fail closed, 503).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any, Protocol

from sandboxsec.crypto.envelope import KEY_BYTES, encode_context, unwrap_secret, wrap_secret
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderUnavailableError,
    TenantKeyMissingError,
)
from sandboxsec.crypto.hsm_objects import find_or_create_secret_keys
from sandboxsec.crypto.keys import (
    KeyProvider,
    LocalKeyProvider,
    Pkcs11KeyProvider,
    gcm,
    gcm_open_any,
)
from sandboxsec.statefiles import create_once

__all__ = [
    "FORMAT_TENANT_HSM",
    "FORMAT_TENANT_LOCAL",
    "LocalTenantKeyStore",
    "Pkcs11TenantKeyStore",
    "TenantKeyStore",
    "build_tenant_key_store",
    "is_tenant_wrapped",
]

FORMAT_TENANT_LOCAL = 0x03
FORMAT_TENANT_HSM = 0x04
_NONCE = 12
_TAG = 16
_TENANT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def is_tenant_wrapped(wrapped: bytes) -> bool:
    """Whether a stored wrapped KEK is wrapped by a per-tenant key (else by the root key)."""
    return bool(wrapped) and wrapped[0] in (FORMAT_TENANT_LOCAL, FORMAT_TENANT_HSM)


def _check_id(tenant_id: str) -> str:
    # The id names a file or an HSM label: refuse anything that could escape either.
    if not _TENANT_ID.match(tenant_id):
        raise ValueError("a tenant id is 1-64 characters of A-Z a-z 0-9 _ -")
    return tenant_id


class TenantKeyStore(Protocol):
    """Holds one key per tenant outside the database; wraps that tenant's KEKs with it."""

    def wrap(self, tenant_id: str, secret: bytes, aad: bytes, *, create: bool) -> bytes:
        """Wrap ``secret`` under the tenant's key; make the key if missing only if ``create``
        (the caller knows no KEK depends on an existing one), else
        :class:`TenantKeyMissingError`."""
        ...

    def unwrap(self, tenant_id: str, wrapped: bytes, aad: bytes) -> bytes:
        """Reverse :meth:`wrap`; :class:`TenantKeyMissingError` if the key is gone."""
        ...

    def destroy(self, tenant_id: str) -> bool:
        """Destroy the tenant's key; True if one existed.  Idempotent."""
        ...

    def exists(self, tenant_id: str) -> bool:
        """Whether the tenant's key exists now."""
        ...

    def count(self) -> int:
        """How many tenant keys the store holds (for health checks)."""
        ...


class LocalTenantKeyStore:
    """Per-tenant key files in their own directory, each wrapped by the local root key."""

    def __init__(self, directory: Path, root: KeyProvider) -> None:
        self._dir = Path(directory)
        self._root = root
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._dir

    def path(self, tenant_id: str) -> Path:
        """The key file of a tenant."""
        return self._dir / f"{_check_id(tenant_id)}.key"

    @staticmethod
    def _file_aad(tenant_id: str) -> bytes:
        return encode_context("sandboxsec/tenant-key/v1", tenant_id)

    def _key(self, tenant_id: str, *, create: bool) -> bytes:
        path = self.path(tenant_id)
        try:
            if create and not path.exists():
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                material = os.urandom(KEY_BYTES)
                create_once(path, self._root.wrap(material, self._file_aad(tenant_id)))
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise TenantKeyMissingError() from None
        except OSError as exc:
            raise KeyProviderUnavailableError(
                f"the tenant key store {self._dir} cannot be used ({exc.strerror})"
            ) from None
        try:
            if os.fstat(fd).st_mode & 0o077:
                raise KeyProviderUnavailableError(
                    f"tenant key file {path} is accessible to other users; it must be mode 0600"
                )
            blob = os.read(fd, 4096)
        finally:
            os.close(fd)
        try:
            return self._root.unwrap(blob, self._file_aad(tenant_id))
        except DecryptionFailedError:
            raise KeyProviderUnavailableError(
                f"tenant key file {path} does not open with the configured root key"
            ) from None

    def wrap(self, tenant_id: str, secret: bytes, aad: bytes, *, create: bool) -> bytes:
        inner = wrap_secret(self._key(tenant_id, create=create), secret, aad)
        return bytes([FORMAT_TENANT_LOCAL]) + inner[1:]

    def unwrap(self, tenant_id: str, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < 1 + _NONCE + _TAG or wrapped[0] != FORMAT_TENANT_LOCAL:
            raise DecryptionFailedError()
        return unwrap_secret(self._key(tenant_id, create=False), b"\x01" + wrapped[1:], aad)

    def destroy(self, tenant_id: str) -> bool:
        path = self.path(tenant_id)
        with self._lock:
            try:
                fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise KeyProviderUnavailableError(
                    f"tenant key file {path} cannot be destroyed ({exc.strerror})"
                ) from None
            try:
                # Overwrite in place before unlinking: a file system that reuses the blocks
                # keeps no copy.  (Copy-on-write file systems and SSD wear levelling may;
                # the root key still guards such remnants, see docs/encryption.md.)
                size = max(os.fstat(fd).st_size, 1)
                os.write(fd, os.urandom(size))
                os.fsync(fd)
            finally:
                os.close(fd)
            path.unlink()
            dir_fd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return True

    def exists(self, tenant_id: str) -> bool:
        return self.path(tenant_id).exists()

    def count(self) -> int:
        try:
            return sum(1 for p in self._dir.iterdir() if p.suffix == ".key")
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise KeyProviderUnavailableError(
                f"the tenant key store {self._dir} cannot be listed ({exc.strerror})"
            ) from None


class Pkcs11TenantKeyStore:
    """Per-tenant AES key objects inside the HSM of a :class:`Pkcs11KeyProvider`."""

    def __init__(self, provider: Pkcs11KeyProvider, label_prefix: str) -> None:
        self._hsm = provider
        self._prefix = f"{label_prefix}/tenant/"

    def label(self, tenant_id: str) -> str:
        """The HSM object label of a tenant's key."""
        return self._prefix + _check_id(tenant_id)

    def _get(self, session: Any, tenant_id: str, *, create: bool) -> list[Any]:
        """The tenant's key objects, the one to wrap with first (several only if duplicates
        were made: :mod:`sandboxsec.crypto.hsm_objects`)."""
        import pkcs11
        from pkcs11 import Attribute, KeyType

        label = self.label(tenant_id)

        def make() -> Any:
            # The root key exists beside every tenant key: health checks and the "root key
            # lost" guard rely on it, and tenants from before per-tenant keys are wrapped by it.
            self._hsm.root_key_handle(create=True)
            return session.generate_key(
                KeyType.AES, KEY_BYTES * 8, label=label, store=True,
                template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.TOKEN: True},
            )

        keys = find_or_create_secret_keys(session, label, self._hsm.creation_lock,
                                          make if create else None)
        if keys:
            return keys
        try:
            session.get_key(label=self._hsm.key_label, key_type=KeyType.AES)
        except pkcs11.NoSuchKey as exc:
            # Not even the root key: the token is gone, not the tenant's key.
            raise self._hsm.unavailable(exc) from None
        except pkcs11.MultipleObjectsReturned:
            pass  # the root key is there (twice): it is the tenant's key that is missing
        raise TenantKeyMissingError() from None

    def wrap(self, tenant_id: str, secret: bytes, aad: bytes, *, create: bool) -> bytes:
        nonce = os.urandom(_NONCE)
        out = self._hsm.run(
            lambda s: gcm(self._get(s, tenant_id, create=create)[0], "encrypt", secret, nonce,
                          aad)
        )
        return bytes([FORMAT_TENANT_HSM]) + nonce + out

    def unwrap(self, tenant_id: str, wrapped: bytes, aad: bytes) -> bytes:
        if len(wrapped) < 1 + _NONCE + _TAG or wrapped[0] != FORMAT_TENANT_HSM:
            raise DecryptionFailedError()
        nonce, body = wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :]
        return self._hsm.run(
            lambda s: gcm_open_any(self._get(s, tenant_id, create=False), body, nonce, aad),
            decrypting=True,
        )

    def destroy(self, tenant_id: str) -> bool:
        import pkcs11

        label = self.label(tenant_id)

        def op(session: Any) -> bool:
            found = list(session.get_objects({pkcs11.Attribute.LABEL: label}))
            for obj in found:
                obj.destroy()
            return bool(found)

        return self._hsm.run(op)

    def exists(self, tenant_id: str) -> bool:
        import pkcs11

        label = self.label(tenant_id)
        return self._hsm.run(
            lambda s: bool(list(s.get_objects({pkcs11.Attribute.LABEL: label})))
        )

    def count(self) -> int:
        import pkcs11

        def op(session: Any) -> int:
            n = 0
            keys = session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
            for obj in keys:
                if str(obj[pkcs11.Attribute.LABEL]).startswith(self._prefix):
                    n += 1
            return n

        return self._hsm.run(op)


def build_tenant_key_store(settings: Any, provider: KeyProvider) -> TenantKeyStore:
    """The tenant key store that goes with ``provider``."""
    if isinstance(provider, Pkcs11KeyProvider):
        return Pkcs11TenantKeyStore(provider, provider.key_label)
    if isinstance(provider, LocalKeyProvider):
        directory = getattr(settings, "tenant_key_dir", None) or Path(settings.home) / "tenant-keys"
        return LocalTenantKeyStore(Path(directory), provider)
    raise KeyProviderUnavailableError(f"no tenant key store for provider {provider.provider_id}")
