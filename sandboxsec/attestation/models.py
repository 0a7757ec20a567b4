"""Tables of the attestation domain: nonces, AK credentials, bound AKs, verdicts.

Every table is tenant-owned (``tenant_id`` indexed, primary key ``id``) and read through
:mod:`sandboxsec.storage.tenancy`, so another tenant's row looks like no row.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = ["AkCredential", "AttestationNonce", "AttestationRecord", "BoundAk"]

_U32 = "{col} IS NULL OR ({col} >= 0 AND {col} <= 4294967295)"


class AttestationNonce(SQLModel, table=True):
    """A consumed challenge nonce.  The primary key makes consumption single-use: the first
    submission inserts the row, every later one collides.  Rows past ``expires_at`` are
    purged (an expired nonce is refused by its own authenticated expiry)."""

    __tablename__ = "attestation_nonces"

    id: str = Field(primary_key=True, max_length=96)  # the nonce, hex
    tenant_id: str = Field(index=True, max_length=40)
    consumed_by: str = Field(default="", max_length=40)
    consumed_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class AkCredential(SQLModel, table=True):
    """An outstanding MakeCredential challenge for one AK and EK; answered at most once.

    Only the SHA-256 of the secret is stored, so a database reader cannot answer it.
    """

    __tablename__ = "attestation_ak_credentials"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    ak_name: str = Field(max_length=140)  # hex
    ak_public: str = Field(max_length=4096)  # hex TPM2B_PUBLIC
    ek_fingerprint: str = Field(max_length=64)  # SHA-256 hex of the EK certificate DER
    ek_certificate: str = Field(max_length=16384)  # base64 DER
    secret_digest: str = Field(max_length=64)  # SHA-256 hex of the credential secret
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class BoundAk(SQLModel, table=True):
    """An AK proven to live in the TPM of a certified EK, and the last clock it quoted.

    The clock fields hold the highest (reset, restart, clock) accepted so far, so a stale or
    replayed quote is refused even across processes.
    """

    __tablename__ = "attestation_bound_aks"
    __table_args__ = (
        UniqueConstraint("tenant_id", "ak_name", name="uq_bound_ak_tenant_name"),
        # TPMS_CLOCK_INFO counters are UINT32: BIGINT plus a range check on both databases.
        CheckConstraint(_U32.format(col="last_reset_count"), name="ck_bound_ak_reset_count_u32"),
        CheckConstraint(
            _U32.format(col="last_restart_count"), name="ck_bound_ak_restart_count_u32"
        ),
    )

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    ak_name: str = Field(max_length=140)
    ak_public: str = Field(max_length=4096)
    ek_fingerprint: str = Field(max_length=64)
    ek_certificate: str = Field(max_length=16384)
    credential_id: str = Field(max_length=40)
    bound_at: datetime = Field(sa_type=UTCDateTime)
    last_reset_count: int | None = Field(default=None, sa_type=BigInteger)
    last_restart_count: int | None = Field(default=None, sa_type=BigInteger)
    last_clock: str | None = Field(default=None, max_length=24)  # u64 as decimal text


class AttestationRecord(SQLModel, table=True):
    """One verdict; ``session_id`` is set when its token starts a session (once only)."""

    __tablename__ = "attestation_records"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    status: str = Field(max_length=20)
    failures: str = Field(default="", max_length=8192)  # comma-separated reason codes
    image_name: str = Field(default="", max_length=500)
    image_digest: str = Field(default="", max_length=80)
    ak_name: str = Field(default="", max_length=140)
    nonce: str = Field(default="", max_length=96)
    created_at: datetime = Field(sa_type=UTCDateTime)
    token_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    session_id: str | None = Field(default=None, max_length=40)
