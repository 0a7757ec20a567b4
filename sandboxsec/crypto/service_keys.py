"""The service's own keys, held once for the cluster: one identity for every node.

A node used to keep its signing and MAC keys in files under its home directory, so two nodes
on one database had two identities: a token issued by one did not verify on the other, and
both signed checkpoints into one tenant's log with different keys.  This module holds them
once, in the ``service_keys`` table:

* ``audit-checkpoint`` (Ed25519) signs the audit log's checkpoints;
* ``audit-hmac`` (32-byte secret) keys the audit log's per-log HMACs and state files;
* ``attestation-token`` (Ed25519) signs attestation tokens (EAR, compact JWS);
* ``attestation-nonce`` (32-byte secret) MACs stateless attestation nonces.

Each is wrapped by the root key (the key provider: a local file, or AES-GCM inside the HSM)
with AAD ``"sandboxsec/v1/service-key" 0x00 name 0x00 kind 0x00 version``, so a wrapped key
cannot be moved to another name or role.  With the PKCS#11 provider the Ed25519 keys are
instead generated inside the HSM as sensitive, non-extractable objects and the row holds only
their label and public key.  (Grant signing keys have their own table, ``GrantKeyring``.)

A new node needs the database URL and the root key, nothing else.  :meth:`ServiceKeys.
establish` runs once per process before anything is signed: under a database lock it creates
the keys when the table is empty (importing this node's old key files if it has any: the
upgrade path), then checks that this node can open every one and that any key file it still
has holds the same key.  Anything else is :class:`NodeIdentityMismatchError`: the node refuses
to start rather than sign or verify with another identity.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlmodel import Session, select

from sandboxsec.clock import Clock
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    KeyProviderMismatchError,
    KeyProviderUnavailableError,
    NodeIdentityMismatchError,
)
from sandboxsec.crypto.keys import KeyProvider
from sandboxsec.crypto.models import ServiceKeyRow
from sandboxsec.crypto.signing import HsmKeyFactory
from sandboxsec.errors import SandboxSecError
from sandboxsec.signing import Signer
from sandboxsec.storage.db import Database

__all__ = [
    "ATTESTATION_NONCE",
    "ATTESTATION_TOKEN",
    "AUDIT_CHECKPOINT",
    "AUDIT_HMAC",
    "SERVICE_KEYS",
    "ServiceKeySpec",
    "ServiceKeyStatus",
    "ServiceKeys",
    "service_key_aad",
]

Kind = Literal["ed25519", "secret"]

AUDIT_CHECKPOINT: Final = "audit-checkpoint"
AUDIT_HMAC: Final = "audit-hmac"
ATTESTATION_TOKEN: Final = "attestation-token"  # noqa: S105 - a key name, not a secret
ATTESTATION_NONCE: Final = "attestation-nonce"

#: ``provider_id`` of a key that lives in the HSM (``wrapped`` is then empty).
HSM_OBJECT: Final = "pkcs11-object:"
_SECRET_BYTES: Final = 32
#: pg_advisory_xact_lock key: the first 8 bytes of SHA-256("sandboxsec/service-keys").
_PG_LOCK_KEY: Final = int.from_bytes(
    hashlib.sha256(b"sandboxsec/service-keys").digest()[:8], "big", signed=True)


@dataclass(frozen=True, slots=True)
class ServiceKeySpec:
    """One service key: its name, kind, and the file a single node kept it in before."""

    name: str
    kind: Kind
    legacy_file: str


SERVICE_KEYS: Final = (
    ServiceKeySpec(AUDIT_CHECKPOINT, "ed25519", "audit/signing_key.pem"),
    ServiceKeySpec(AUDIT_HMAC, "secret", "audit/hmac_secret"),
    ServiceKeySpec(ATTESTATION_TOKEN, "ed25519", "attestation-token-key.pem"),
    ServiceKeySpec(ATTESTATION_NONCE, "secret", "attestation-nonce-key"),
)


@dataclass(frozen=True, slots=True)
class ServiceKeyStatus:
    """What ``sandboxsec keys service`` shows of one key (never its material)."""

    name: str
    version: int
    kind: str
    holder: str
    origin: str
    fingerprint: str


def service_key_aad(name: str, kind: str, version: int) -> bytes:
    """The AAD a service key is wrapped with: it binds the name, the kind and the version."""
    return b"\x00".join((b"sandboxsec/v1/service-key", name.encode("ascii"),
                         kind.encode("ascii"), str(version).encode("ascii")))


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _fingerprint(row: ServiceKeyRow) -> str:
    # Public keys are named by their hash; secrets are not named at all (a hash of a MAC key
    # helps no one, but nothing is gained by publishing it either).
    if row.kind == "ed25519":
        return hashlib.sha256(row.public_key).hexdigest()[:16]
    return "-"


class ServiceKeys:
    """The cluster's service keys, established once per process and then served from memory.

    ``home`` is where this node's old key files are looked for (read only: nothing is ever
    written there).  ``hsm`` makes Ed25519 keys inside the HSM when the provider is one.
    """

    def __init__(self, db: Database, clock: Clock, root: KeyProvider, home: Path,
                 hsm: HsmKeyFactory | None = None) -> None:
        self._db = db
        self._clock = clock
        self._root = root
        self._home = home
        self._hsm = hsm
        self._lock = threading.Lock()
        self._signers: dict[str, Signer] = {}
        self._secrets: dict[str, bytes] = {}
        self._rows: dict[str, ServiceKeyRow] = {}
        self._imported: tuple[str, ...] = ()

    # ------------------------------------------------------------------ use

    def signer(self, name: str) -> Signer:
        """The signing key ``name`` (establishing the keys first if needed)."""
        self.establish()
        return self._signers[name]

    def secret(self, name: str) -> bytes:
        """The 32-byte secret ``name`` (establishing the keys first if needed)."""
        self.establish()
        return self._secrets[name]

    def prepare(self) -> None:
        """Establish the keys now, outside any transaction, if that works; a failure is left
        for the first use to raise (where it fails that request closed)."""
        try:
            self.establish()
        except (SandboxSecError, SQLAlchemyError):
            return

    def status(self) -> list[ServiceKeyStatus]:
        """Every service key: where it is held and its public fingerprint."""
        self.establish()
        return [
            ServiceKeyStatus(name=r.name, version=r.version, kind=r.kind,
                             holder="hsm" if r.provider_id.startswith(HSM_OBJECT)
                             else f"wrapped by {r.provider_id}",
                             origin=r.origin, fingerprint=_fingerprint(r))
            for r in sorted(self._rows.values(), key=lambda r: r.name)
        ]

    # ------------------------------------------------------------------ establish

    def establish(self) -> list[str]:
        """Create (first node) or load (every other node) the keys and check this node's.

        Returns the names of the keys this process imported from this node's old key files
        (the same list on every call).
        Steps, in order:

        1. Under a database lock (PostgreSQL advisory lock; SQLite's single writer), read the
           table; make any missing key (imported from this node's file if it has one, else
           generated, in the HSM when the provider is one) and insert it in the same
           transaction, so two nodes starting at once on an empty database agree on one set.
        2. Open every key with this node's root key (or find it in this node's HSM); a key
           wrapped by another root, or an HSM object with another public key, is a mismatch.
        3. A key file this node still has must hold the cluster's key; another is a mismatch.

        Raises :class:`NodeIdentityMismatchError` (the node must not start),
        :class:`KeyProviderUnavailableError` or a database error (fail closed).
        """
        with self._lock:
            if self._rows:
                return list(self._imported)
            # Every start but the cluster's first finds the keys: read them without the lock
            # (a writer lock taken here could wait on the caller's own open transaction).
            with self._db.session() as s:
                rows = {r.name: r for r in s.exec(select(ServiceKeyRow)).all()}
            if all(spec.name in rows for spec in SERVICE_KEYS):
                self._load(rows)
                return []
            imported: list[str] = []
            with self._db.session() as s:
                self._serialise(s)
                rows = {r.name: r for r in s.exec(select(ServiceKeyRow)).all()}
                fresh: list[ServiceKeyRow] = []
                for spec in SERVICE_KEYS:
                    if spec.name not in rows:
                        row = self._make(spec)
                        fresh.append(row)
                        if row.origin == "imported":
                            imported.append(spec.name)
                        s.add(row)
                try:
                    s.flush()
                except IntegrityError:
                    # Only without the lock (a database that cannot take it): another node
                    # inserted first.  Its keys win; re-read them below.
                    s.rollback()
                    fresh, imported = [], []
                    rows = {}
            if not rows:
                with self._db.session() as s:
                    rows = {r.name: r for r in s.exec(select(ServiceKeyRow)).all()}
            for row in fresh:
                rows[row.name] = row
            self._load(rows)
            self._imported = tuple(imported)
            return imported

    def _serialise(self, s: Session) -> None:
        """Take the database lock that orders every node's first start."""
        if self._db.is_postgres:
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        else:
            # The first write of an SQLite transaction takes the single writer lock (and the
            # cross-process writer lock file) until commit.
            s.execute(text("DELETE FROM service_keys WHERE 1 = 0"))

    def _make(self, spec: ServiceKeySpec) -> ServiceKeyRow:
        """A new key for ``spec``: this node's old file's key if there is one, else fresh."""
        now = self._clock.now()
        legacy = self._legacy(spec)
        origin = "imported" if legacy is not None else "generated"
        if spec.kind == "secret":
            secret = legacy if isinstance(legacy, bytes) else _new_secret()
            return ServiceKeyRow(name=spec.name, version=1, kind=spec.kind, public_key=b"",
                                 wrapped=self._wrap(spec, secret),
                                 provider_id=self._root.provider_id, origin=origin,
                                 created_at=now)
        if legacy is None and self._hsm is not None:
            # Generated inside the HSM (or adopted: an HSM deployment of an earlier version
            # made its checkpoint key under this very label).  Nothing leaves the token.
            hsm_key = self._hsm.create(spec.name)
            public = hsm_key.public_key()
            return ServiceKeyRow(name=spec.name, version=1, kind=spec.kind,
                                 public_key=_raw_public(public), wrapped=b"",
                                 provider_id=f"{HSM_OBJECT}{hsm_key.label}", origin=origin,
                                 created_at=now)
        private = legacy if isinstance(legacy, Ed25519PrivateKey) else Ed25519PrivateKey.generate()
        return ServiceKeyRow(name=spec.name, version=1, kind=spec.kind,
                             public_key=_raw_public(private.public_key()),
                             wrapped=self._wrap(spec, _raw_private(private)),
                             provider_id=self._root.provider_id, origin=origin, created_at=now)

    def _wrap(self, spec: ServiceKeySpec, material: bytes) -> bytes:
        return self._root.wrap(material, service_key_aad(spec.name, spec.kind, 1))

    def _legacy(self, spec: ServiceKeySpec) -> Ed25519PrivateKey | bytes | None:
        """This node's old key file for ``spec``, parsed; None when there is none."""
        path = self._home / spec.legacy_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise NodeIdentityMismatchError(
                f"the key file {path} cannot be read ({exc.strerror})") from None
        if spec.kind == "secret":
            if len(data) != _SECRET_BYTES:
                raise NodeIdentityMismatchError(f"the key file {path} is not a 32-byte secret")
            return data
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PrivateKey):
            raise NodeIdentityMismatchError(f"the key file {path} is not an Ed25519 key")
        return key

    def _load(self, rows: dict[str, ServiceKeyRow]) -> None:
        signers: dict[str, Signer] = {}
        secrets_: dict[str, bytes] = {}
        for spec in SERVICE_KEYS:
            row = rows.get(spec.name)
            if row is None or row.kind != spec.kind or row.version != 1:
                raise NodeIdentityMismatchError(
                    f"the cluster's service key {spec.name!r} is missing or malformed")
            if spec.kind == "secret":
                secrets_[spec.name] = self._open(row)
            else:
                signers[spec.name] = self._signer(row)
            # 3. A key file left on this node must hold the cluster's key.
            self._check_legacy(spec, signers.get(spec.name), secrets_.get(spec.name))
        self._signers, self._secrets, self._rows = signers, secrets_, dict(rows)

    def _open(self, row: ServiceKeyRow) -> bytes:
        """Unwrap ``row`` with this node's root key; another root is a mismatch."""
        with _mismatch_if_foreign(row, self._root):
            out = self._root.unwrap(row.wrapped, service_key_aad(row.name, row.kind,
                                                                 row.version))
        if row.kind == "secret" and len(out) != _SECRET_BYTES:
            raise NodeIdentityMismatchError(f"the service key {row.name!r} is malformed")
        return out

    def _signer(self, row: ServiceKeyRow) -> Signer:
        if row.provider_id.startswith(HSM_OBJECT):
            if self._hsm is None:
                raise NodeIdentityMismatchError(
                    f"the cluster's {row.name} key is in an HSM; this node's key provider is "
                    "not PKCS#11")
            signer: Signer = self._hsm.existing(row.provider_id.removeprefix(HSM_OBJECT))
        else:
            try:
                signer = Ed25519PrivateKey.from_private_bytes(self._open(row))
            except ValueError:
                raise NodeIdentityMismatchError(
                    f"the service key {row.name!r} is malformed") from None
        # The stored public key is what tokens and checkpoints are verified with; the key we
        # sign with must be its private half (catches an HSM object of the same label made
        # by another cluster, and a swapped public key column).
        if not hmac.compare_digest(_raw_public(signer.public_key()), row.public_key):
            raise NodeIdentityMismatchError(
                f"this node's {row.name} key is not the cluster's (public keys differ)")
        return signer

    def _check_legacy(self, spec: ServiceKeySpec, signer: Signer | None,
                      secret: bytes | None) -> None:
        legacy = self._legacy(spec)
        if legacy is None:
            return
        path = self._home / spec.legacy_file
        if isinstance(legacy, bytes):
            same = secret is not None and hmac.compare_digest(legacy, secret)
        else:
            same = signer is not None and hmac.compare_digest(
                _raw_public(legacy.public_key()), _raw_public(signer.public_key()))
        if not same:
            raise NodeIdentityMismatchError(
                f"the key file {path} holds another key than the cluster's {spec.name}: this "
                "node was set up on its own; move the file away to join the cluster")


def _new_secret() -> bytes:
    import secrets

    return secrets.token_bytes(_SECRET_BYTES)


@contextmanager
def _mismatch_if_foreign(row: ServiceKeyRow, root: KeyProvider) -> Iterator[None]:
    """Turn "this root key cannot open the cluster's key" into the node-identity error."""
    try:
        yield
    except (DecryptionFailedError, KeyProviderMismatchError):
        try:
            mine = root.provider_id
        except KeyProviderUnavailableError:
            mine = "unavailable"
        raise NodeIdentityMismatchError(
            f"this node's root key ({mine}) does not open the cluster's {row.name} key "
            f"(wrapped by {row.provider_id}): give this node the cluster's root key") from None
