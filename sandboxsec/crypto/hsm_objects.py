"""Find-or-create of PKCS#11 key objects, race-free across processes.

PKCS#11 has no "create if absent": two processes (the workers of one server) that both find no
object labelled L both generate one, and the token then holds two keys under one label; every
later lookup by label is ambiguous.  So:

1. Creation is serialised by an exclusive ``flock`` on a file shared by every process of this
   host that uses the token (:class:`CreationLock`), and the lookup is repeated inside the
   lock: the second process finds the first one's key instead of making its own.
2. Duplicates that exist anyway (made before this lock existed, or by nodes on different hosts
   sharing one network HSM) are put in one deterministic order, the same in every process:
   by key check value (the AES encryption of a zero block, as payment HSMs print it), then by
   ``CKA_ID``.  Every process wraps with the first; unwrapping tries each in that order, and
   AES-GCM authenticates, so only the key that wrapped a blob opens it.  No lookup ever fails
   because of a duplicate.

The key check value is computed only when duplicates exist and is never stored or logged.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sandboxsec.crypto.errors import KeyProviderUnavailableError

__all__ = ["CreationLock", "default_lock_dir", "find_or_create_secret_keys", "find_secret_keys"]

#: How long a process waits for another one's key creation (a generate call takes
#: milliseconds; a lock held longer means a hung process, and the caller fails closed).
LOCK_TIMEOUT_SECONDS = 10.0


def default_lock_dir() -> Path:
    """A directory private to this user (``$TMPDIR/sandboxsec-locks-<uid>``, mode 0700).

    Refused (:class:`KeyProviderUnavailableError`) if it exists but belongs to someone else or
    others may write to it: a lock file another user controls could be held forever.
    """
    path = Path(tempfile.gettempdir()) / f"sandboxsec-locks-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise KeyProviderUnavailableError(
            f"the key-creation lock directory {path} is not a private directory of this user"
        )
    return path


class CreationLock:
    """An exclusive lock on ``<directory>/pkcs11-<hash of module and token>.lock``.

    The kernel releases a ``flock`` when its holder dies, so a crashed worker never leaves
    the token locked.  Re-entrant within a thread (making a tenant key first makes the root
    key, under the same lock); other threads of the process wait.
    """

    def __init__(self, directory: Path, module: str, token_label: str,
                 timeout: float = LOCK_TIMEOUT_SECONDS) -> None:
        digest = hashlib.sha256(f"{module}\x00{token_label}".encode()).hexdigest()[:24]
        self.path = Path(directory) / f"pkcs11-{digest}.lock"
        self._timeout = timeout
        self._local = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for the ``with`` body; :class:`KeyProviderUnavailableError` if it
        cannot be opened or is not free within the timeout."""
        with self._local:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with self._file_lock():
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                         0o600)
        except OSError as exc:
            raise KeyProviderUnavailableError(
                f"the key-creation lock {self.path} cannot be opened ({exc.strerror})"
            ) from None
        try:
            deadline = time.monotonic() + self._timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise KeyProviderUnavailableError(
                            f"the key-creation lock {self.path} cannot be taken "
                            f"({exc.strerror})"
                        ) from None
                    if time.monotonic() >= deadline:
                        raise KeyProviderUnavailableError(
                            f"another process has held the key-creation lock {self.path} "
                            f"for over {self._timeout:.0f} s"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock


def _check_value(key: Any) -> bytes:
    from pkcs11 import Mechanism

    try:
        kcv: bytes = key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
        return kcv
    except Exception:  # a token that refuses ECB on this key: order by CKA_ID alone
        return b""


def _key_id(key: Any) -> bytes:
    from pkcs11 import Attribute

    try:
        return bytes(key[Attribute.ID])
    except Exception:
        return b""


def find_secret_keys(session: Any, label: str) -> list[Any]:
    """Every AES key object labelled ``label``, in the deterministic order described above
    (the first is the one to wrap with); empty if there is none."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                      Attribute.KEY_TYPE: KeyType.AES,
                                      Attribute.LABEL: label}))
    if len(found) > 1:
        found.sort(key=lambda k: (_check_value(k), _key_id(k)))
    return found


def find_or_create_secret_keys(session: Any, label: str, lock: CreationLock,
                               create: Callable[[], Any] | None) -> list[Any]:
    """:func:`find_secret_keys`, making the key with ``create()`` under ``lock`` when there is
    none (and ``create`` is given).  Returns an empty list only when ``create`` is None."""
    keys = find_secret_keys(session, label)
    if keys or create is None:
        return keys
    with lock.held():
        # 1. Another process may have made it while this one waited for the lock.
        keys = find_secret_keys(session, label)
        if keys:
            return keys
        # 2. Still none: make it, then read back what the token holds under the label.
        create()
        return find_secret_keys(session, label)
