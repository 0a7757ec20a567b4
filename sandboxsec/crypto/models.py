"""Tables of the key hierarchy: keyrings, wrapped KEKs and DEKs.

Nothing here holds key material or trajectory content in clear: KEKs are wrapped by the
root key, DEKs by a KEK, record metadata and data are sealed under a DEK.  What stays in
clear is what must stay searchable: time, kind, size and content hash.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = [
    "DataEncryptionKey",
    "KeyEncryptionKey",
    "ServiceKeyRow",
    "TenantKeyring",
]


class TenantKeyring(SQLModel, table=True):
    """A tenant's key state: current KEK version, oldest readable version, shredding."""

    __tablename__ = "crypto_keyrings"

    # One row per tenant: the id is the tenant id.
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    current_version: int = Field(default=1)
    min_decryption_version: int = Field(default=1)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    shredded_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class KeyEncryptionKey(SQLModel, table=True):
    """One version of a tenant's KEK, wrapped by the root key of ``provider_id``."""

    __tablename__ = "crypto_keks"
    __table_args__ = (UniqueConstraint("tenant_id", "version", name="uq_crypto_keks_version"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    version: int
    provider_id: str = Field(max_length=200)
    wrapped_key: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(sa_type=UTCDateTime)


class DataEncryptionKey(SQLModel, table=True):
    """A data key of one session's records, wrapped by KEK ``kek_version`` of the tenant."""

    __tablename__ = "crypto_deks"

    # The 16-byte DEK id in hex: the same id is written into every ciphertext header.
    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    session_id: str = Field(index=True, max_length=40)
    kek_version: int = Field(index=True)
    wrapped_key: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(sa_type=UTCDateTime)
    rewrapped_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ServiceKeyRow(SQLModel, table=True):
    """One of the service's own keys, held once for every node (``crypto/service_keys.py``).

    ``wrapped`` is the key wrapped by the root key of ``provider_id`` (AAD binds name, kind and
    version); for a signing key generated inside an HSM it is empty and ``provider_id`` is
    ``pkcs11-object:<label>``.  ``public_key`` is the raw Ed25519 public key of a signing key
    (empty for a secret); it is checked against the unwrapped private key on every load.
    """

    __tablename__ = "service_keys"

    name: str = Field(primary_key=True, max_length=64)
    version: int = Field(primary_key=True)
    kind: str = Field(max_length=16)
    public_key: bytes = Field(sa_type=LargeBinary)
    wrapped: bytes = Field(sa_type=LargeBinary)
    provider_id: str = Field(max_length=200)
    origin: str = Field(max_length=16)
    created_at: datetime = Field(sa_type=UTCDateTime)
