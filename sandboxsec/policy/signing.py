"""The grant signing key, shared by every worker through the database.

The Ed25519 private key is stored wrapped by the root key provider; every worker uses the
oldest unretired key, so two workers that create one at the same moment still agree.
"""

from __future__ import annotations

import threading
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from sqlmodel import Session, col, select

from sandboxsec.clock import Clock
from sandboxsec.errors import SandboxSecError
from sandboxsec.policy.errors import GrantKeyUnavailableError, GrantSignatureInvalidError
from sandboxsec.policy.grants import key_id
from sandboxsec.policy.models import GrantSigningKey
from sandboxsec.storage.db import Database

__all__ = ["GrantKeyring", "GrantSigner", "KeyWrapper"]


class KeyWrapper(Protocol):
    """Wraps and unwraps secrets under the root key (the key provider does)."""

    @property
    def provider_id(self) -> str:
        """Which root key wraps."""
        ...

    def wrap(self, secret: bytes, aad: bytes) -> bytes:
        """``secret`` wrapped, bound to ``aad``."""
        ...

    def unwrap(self, wrapped: bytes, aad: bytes) -> bytes:
        """What :meth:`wrap` wrapped, checked against ``aad``."""
        ...


class GrantSigner(Protocol):
    """The grant keys the grant service signs and verifies with."""

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The key id and private key new grants are signed with."""
        ...

    def private_for(self, kid: str) -> Ed25519PrivateKey:
        """The private key ``kid`` (a grant issued before a key change is re-signed by it)."""
        ...

    def cached_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The public keys known without a database read."""
        ...

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every public key, re-read."""
        ...


def _key_aad(kid: str) -> bytes:
    return b"sandboxsec/v1/grant-signing-key\x00" + kid.encode("ascii")


class GrantKeyring:
    """:class:`GrantSigner` on the database, the private keys wrapped by the root key."""

    def __init__(self, db: Database, clock: Clock, wrapper: KeyWrapper) -> None:
        self._db = db
        self._clock = clock
        self._wrapper = wrapper
        self._lock = threading.Lock()
        self._signing: tuple[str, Ed25519PrivateKey] | None = None
        self._public: dict[str, Ed25519PublicKey] = {}

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The key id and private key new grants are signed with (created on first use)."""
        with self._lock:
            if self._signing is None:
                self._signing = self._load_or_create()
            return self._signing

    def cached_public_keys(self) -> dict[str, Ed25519PublicKey]:
        """The public keys read by the last :meth:`public_keys`."""
        with self._lock:
            return dict(self._public)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every grant public key, re-read from the database."""
        with self._db.session() as s:
            rows = s.exec(select(GrantSigningKey)).all()
        keys = {r.id: Ed25519PublicKey.from_public_bytes(r.public_key) for r in rows}
        with self._lock:
            self._public = keys
            return dict(keys)

    def private_for(self, kid: str) -> Ed25519PrivateKey:
        """The private key ``kid``; refused when it is gone."""
        with self._db.session() as s:
            row = s.get(GrantSigningKey, kid)
        if row is None:
            raise GrantSignatureInvalidError("the grant's signing key is gone")
        return self._unwrap(row)

    def _load_or_create(self) -> tuple[str, Ed25519PrivateKey]:
        with self._db.session() as s:
            row = self._active(s)
        if row is None:
            private = Ed25519PrivateKey.generate()
            kid = key_id(private.public_key())
            raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
            try:
                wrapped = self._wrapper.wrap(raw, _key_aad(kid))
                provider = self._wrapper.provider_id
            except SandboxSecError as exc:
                raise GrantKeyUnavailableError("the root key cannot wrap a grant key") from exc
            with self._db.session() as s:
                s.add(GrantSigningKey(
                    id=kid, private_key=wrapped, provider_id=provider,
                    public_key=private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                    created_at=self._clock.now(),
                ))
        # Two workers may have created a key at once: everyone uses the oldest one.
        with self._db.session() as s:
            row = self._active(s)
        assert row is not None
        return row.id, self._unwrap(row)

    def _unwrap(self, row: GrantSigningKey) -> Ed25519PrivateKey:
        try:
            raw = self._wrapper.unwrap(row.private_key, _key_aad(row.id))
        except SandboxSecError as exc:
            raise GrantKeyUnavailableError("the grant signing key cannot be unwrapped") from exc
        return Ed25519PrivateKey.from_private_bytes(raw)

    @staticmethod
    def _active(s: Session) -> GrantSigningKey | None:
        return s.exec(
            select(GrantSigningKey)
            .where(col(GrantSigningKey.retired_at).is_(None))
            .order_by(col(GrantSigningKey.created_at), col(GrantSigningKey.id))
        ).first()
