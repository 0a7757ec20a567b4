"""Tables of people: persons, passkeys, enrolment links, challenges, sign-ins, routing, votes."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from sandboxsec.storage.types import UTCDateTime

__all__ = [
    "ApprovalRoute",
    "ApprovalVote",
    "Enrolment",
    "Person",
    "PersonCredential",
    "PersonSignin",
    "SessionOwner",
    "WebauthnChallenge",
]


class Person(SQLModel, table=True):
    """Someone who approves agent actions for a tenant."""

    __tablename__ = "people"
    __table_args__ = (UniqueConstraint("tenant_id", "handle", name="uq_people_handle"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    name: str = Field(max_length=200)
    handle: str = Field(max_length=64)
    #: JSON list of approver group names, sorted
    groups_json: str = Field(sa_column=Column(Text, nullable=False))
    #: WebAuthn user.id: 32 random bytes, never personal data
    user_handle: bytes = Field(sa_column=Column(LargeBinary, nullable=False, unique=True))
    created_at: datetime = Field(sa_type=UTCDateTime)
    created_by: str = Field(max_length=40)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class Enrolment(SQLModel, table=True):
    """A one-time enrolment link; only the SHA-256 of its token is stored."""

    __tablename__ = "person_enrolments"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    person_id: str = Field(index=True, max_length=40)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PersonCredential(SQLModel, table=True):
    """A registered passkey: what offline re-verification of its assertions needs."""

    __tablename__ = "person_credentials"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    person_id: str = Field(index=True, max_length=40)
    #: the raw credential id; unique across every tenant (duplicates are refused)
    credential_id: bytes = Field(sa_column=Column(LargeBinary, nullable=False, unique=True))
    #: COSE_Key bytes exactly as registered
    public_key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    sign_count: int = Field(default=0)
    aaguid: str = Field(default="", max_length=36)
    backup_eligible: bool = Field(default=False)
    created_at: datetime = Field(sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    #: when an admin revoked it (a lost or replaced device): it signs nothing any more
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class WebauthnChallenge(SQLModel, table=True):
    """A server-made, single-use challenge (enrolment, sign-in or one decision)."""

    __tablename__ = "webauthn_challenges"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(default="", index=True, max_length=40)
    purpose: str = Field(max_length=16)
    person_id: str | None = Field(default=None, max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    decision: str | None = Field(default=None, max_length=16)
    challenge: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    #: what the challenge commits to (the preimage of its hash), logged with the decision
    preimage: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PersonSignin(SQLModel, table=True):
    """A person's sign-in on the approval page; only the SHA-256 of the cookie is stored."""

    __tablename__ = "person_signins"

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    person_id: str = Field(index=True, max_length=40)
    credential_row_id: str = Field(max_length=40)
    token_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    ended_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class SessionOwner(SQLModel, table=True):
    """The person an agent session acts for: set once, from the tenant side, never by the agent."""

    __tablename__ = "session_owners"

    session_id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    person_id: str = Field(max_length=40)
    assigned_at: datetime = Field(sa_type=UTCDateTime)
    assigned_by: str = Field(max_length=40)


class ApprovalRoute(SQLModel, table=True):
    """Who decides one approval request, fixed when the request is created."""

    __tablename__ = "approval_routes"

    approval_id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    rule_id: str = Field(max_length=64)
    owner_id: str | None = Field(default=None, max_length=40)
    #: JSON list of the person ids the request is routed to, sorted
    people_json: str = Field(sa_column=Column(Text, nullable=False))
    quorum: int = Field(default=1)
    #: "passkey" (a person's passkey must approve) or "key" (an approver API key may)
    signer: str = Field(max_length=16)


class ApprovalVote(SQLModel, table=True):
    """One person's passkey-signed decision on one request (a quorum counts distinct people)."""

    __tablename__ = "approval_votes"
    __table_args__ = (UniqueConstraint("approval_id", "person_id", name="uq_vote_person"),)

    id: str = Field(primary_key=True, max_length=40)
    tenant_id: str = Field(index=True, max_length=40)
    approval_id: str = Field(index=True, max_length=40)
    person_id: str = Field(max_length=40)
    credential_row_id: str = Field(max_length=40)
    decision: str = Field(max_length=16)
    created_at: datetime = Field(sa_type=UTCDateTime)
