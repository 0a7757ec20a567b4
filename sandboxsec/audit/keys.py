"""The service's audit keys: the Ed25519 checkpoint signing key and the HMAC root secret.

Both live under ``<home>/audit/`` with mode 0600 and are created on first use.  Creation is
race-free across worker processes: each process writes a private temporary file and
``os.link``s it into place; the loser of the race reads the winner's file.

Per-log HMAC keys are derived, never stored: ``HKDF-SHA256(secret, info="sandboxsec audit
hmac v1" || 0x00 || log_id)``, so each tenant's MACs are unlinkable to another tenant's.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandboxsec.audit.checkpoint import key_id, verifier_key
from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.encoding import b64decode_strict
from sandboxsec.statefiles import create_once

if TYPE_CHECKING:
    from sandboxsec.signing import Signer

__all__ = ["AuditKeys", "derive_hmac_key", "load_public_key"]

_HMAC_INFO = b"sandboxsec audit hmac v1\x00"
_STATE_INFO = b"sandboxsec audit state v1"


def derive_hmac_key(secret: bytes, log_id: str) -> bytes:
    """The 32-byte HMAC key of one log (pure)."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=_HMAC_INFO + log_id.encode()
    ).derive(secret)


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM, or from a signed-note verifier key ``name+id+b64``."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(text)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the public key is not an Ed25519 key")
        return key
    parts = text.decode("ascii").split("+", 2)
    if len(parts) != 3:
        raise ValueError("the public key is neither PEM nor a signed-note verifier key")
    raw = b64decode_strict(parts[2])
    if len(raw) != 33 or raw[0] != 1:
        raise ValueError("the verifier key is not an Ed25519 key")
    key = Ed25519PublicKey.from_public_bytes(raw[1:])
    if key_id(parts[0], key).hex() != parts[1]:
        raise ValueError("the verifier key's id does not match its key")
    return key


class AuditKeys:
    """Loads (or creates) the keys under ``<home>/audit`` once, then serves them from memory."""

    def __init__(self, home: Path, key_name: str,
                 hsm: Callable[[], Signer | None] | None = None,
                 shared: Callable[[], tuple[Signer, bytes]] | None = None) -> None:
        """``shared`` gives the cluster's checkpoint key and HMAC secret (the service keys in
        the database or the HSM, ``crypto/service_keys.py``); without it the keys are the
        files under ``<home>/audit`` (or ``hsm``'s key), as for a single embedded node."""
        self._dir = home / "audit"
        self.key_name = key_name
        self._hsm = hsm
        self._shared = shared
        self._lock = threading.Lock()
        self._signing: Signer | None = None
        self._secret: bytes | None = None
        self._hmac: dict[str, bytes] = {}

    def _load(self) -> None:
        if self._shared is not None:
            self._signing, self._secret = self._shared()
            return
        key_file = self._dir / "signing_key.pem"
        # With an HSM the checkpoint key is made and used inside it, unless a key file exists
        # from before (auditors pin that key: moving to the HSM is an explicit key change).
        signer = self._hsm() if self._hsm is not None and not key_file.exists() else None
        try:
            secret = create_once(self._dir / "hmac_secret", secrets.token_bytes(32))
            if signer is not None:
                signer.public_key()  # fail closed now if the HSM cannot serve the key
        except (OSError, ValueError) as exc:
            raise AuditUnavailableError("the audit keys cannot be read") from exc
        if signer is not None:
            if len(secret) != 32:
                raise AuditUnavailableError("the audit key files are not valid")
            self._signing, self._secret = signer, secret
            return
        try:
            pem = create_once(
                self._dir / "signing_key.pem",
                Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            key = serialization.load_pem_private_key(pem, password=None)
            secret = create_once(self._dir / "hmac_secret", secrets.token_bytes(32))
        except (OSError, ValueError) as exc:
            raise AuditUnavailableError("the audit keys cannot be read") from exc
        if not isinstance(key, Ed25519PrivateKey) or len(secret) != 32:
            raise AuditUnavailableError("the audit key files are not valid")
        self._signing, self._secret = key, secret

    @property
    def signing_key(self) -> Signer:
        with self._lock:
            if self._signing is None:
                self._load()
            assert self._signing is not None
            return self._signing

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.signing_key.public_key()

    def public_pem(self) -> str:
        """The public key as PEM (SubjectPublicKeyInfo), what ``audit verify`` takes."""
        return (
            self.public_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )

    def verifier_key(self) -> str:
        """The signed-note verifier key string of the checkpoint key."""
        return verifier_key(self.key_name, self.public_key)

    def state_key(self) -> bytes:
        """The MAC key of the signed-state files (derived, separate from every log's key)."""
        with self._lock:
            if self._secret is None:
                self._load()
            assert self._secret is not None
            secret = self._secret
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_STATE_INFO).derive(
            secret
        )

    def hmac_key(self, log_id: str) -> bytes:
        """The HMAC key of one log."""
        with self._lock:
            cached = self._hmac.get(log_id)
            if cached is not None:
                return cached
            if self._secret is None:
                self._load()
            assert self._secret is not None
            k = derive_hmac_key(self._secret, log_id)
            if len(self._hmac) > 10_000:
                self._hmac.clear()
            self._hmac[log_id] = k
            return k
