"""People: enrolment, passkey registration, passkey sign-in and session owners.

The adapter around :mod:`.passkeys` (pure WebAuthn): it stores people, their passkeys, one-time
enrolment links, single-use challenges and sign-ins, and appends an audit entry in the same
transaction as each change.  A passkey's registration entry records everything an auditor
needs to re-verify its later assertions offline (COSE public key, RP id, origins, flags).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord, AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import NotFoundError, SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.people.errors import (
    AssertionChallengeUnknownError,
    AssertionCounterError,
    AssertionReplayedError,
    ChallengeExpiredError,
    CredentialDuplicateError,
    CredentialRevokedError,
    CredentialUnknownError,
    EnrolmentInvalidError,
    PersonHandleTakenError,
    PersonInvalidError,
    SessionOwnerInvalidError,
    SessionOwnerSetError,
    SigninRequiredError,
)
from sandboxsec.people.models import (
    Enrolment,
    Person,
    PersonCredential,
    PersonSignin,
    SessionOwner,
    WebauthnChallenge,
)
from sandboxsec.people.passkeys import (
    Assertion,
    authentication_options,
    b64url,
    parse_assertion,
    registration_options,
    verify_assertion,
    verify_registration,
)
from sandboxsec.policy.routing import GROUP_NAME
from sandboxsec.principal import Principal
from sandboxsec.sessions.models import AgentSession
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from sandboxsec.storage.tenancy import get_scoped, select_scoped

__all__ = [
    "CredentialView",
    "EnrolmentLink",
    "PeopleService",
    "PersonPrincipal",
    "PersonView",
    "SigninResult",
]

_HANDLE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_MAX_GROUPS = 32
#: How long an expired challenge row is kept (then it is deleted when a new one is made).
_CHALLENGE_KEEP = timedelta(minutes=10)
#: Audit role of a person (people hold no API key; their actor id is their person id).
PERSON_ROLE = "person"


@dataclass(frozen=True, slots=True)
class CredentialView:
    """A registered passkey as an admin sees it (never the key material)."""

    id: str
    credential_id: str
    aaguid: str
    backup_eligible: bool
    sign_count: int
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PersonView:
    """A person of a tenant."""

    id: str
    tenant_id: str
    name: str
    handle: str
    groups: tuple[str, ...]
    created_at: datetime
    disabled_at: datetime | None
    credentials: tuple[CredentialView, ...]


@dataclass(frozen=True, slots=True)
class EnrolmentLink:
    """A one-time enrolment link, shown once (only its hash is stored)."""

    person_id: str
    token: str
    path: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class PersonPrincipal:
    """A person signed in with a passkey on the approval page."""

    tenant_id: str
    person_id: str
    name: str
    handle: str
    signin_id: str
    expires_at: datetime

    def as_principal(self) -> Principal:
        """The person as the actor of policy changes (their person id in the key id field)."""
        from sandboxsec.principal import Role

        return Principal(self.tenant_id, self.person_id, Role.APPROVER)


@dataclass(frozen=True, slots=True)
class SigninResult:
    """A new sign-in: the cookie value (shown once) and who signed in."""

    token: str
    person: PersonPrincipal


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _person_record(person_id: str, tenant_id: str, event: AuditEvent, outcome: str, *,
                   reason: str | None = None, object_ids: Mapping[str, str] | None = None,
                   body: Mapping[str, Any] | None = None) -> AuditRecord:
    """An audit record whose actor is a person (role ``person``, id = person id)."""
    return AuditRecord(event=event, tenant_id=tenant_id, actor_key_id=person_id,
                       actor_role=PERSON_ROLE, outcome=outcome, reason=reason,
                       object_ids=dict(object_ids or {}), body=dict(body or {}))


class PeopleService:
    """Enrols people, registers their passkeys, signs them in, assigns session owners."""

    def __init__(self, *, db: Database, clock: Clock, settings: Settings,
                 audit: AuditSink) -> None:
        self._db = db
        self._clock = clock
        self._settings = settings
        self._audit = audit

    # ------------------------------------------------------------------ settings

    @property
    def rp_id(self) -> str:
        """The WebAuthn relying party id."""
        return self._settings.webauthn_rp_id

    @property
    def origins(self) -> tuple[str, ...]:
        """The origins passkeys may be used on."""
        return self._settings.webauthn_origins()

    def _timeout_ms(self) -> int:
        return self._settings.webauthn_challenge_ttl_seconds * 1000

    # ------------------------------------------------------------------ admin side

    def create_person(self, who: Principal, *, name: Any, handle: Any, groups: Any
                      ) -> tuple[PersonView, EnrolmentLink]:
        """Create a person and their first one-time enrolment link (audited together)."""
        name, handle, group_list = _valid_person(name, handle, groups)
        now = self._clock.now()
        person = Person(id=new_id("per"), tenant_id=who.tenant_id, name=name, handle=handle,
                        groups_json=json.dumps(group_list), user_handle=secrets.token_bytes(32),
                        created_at=now, created_by=who.key_id)
        try:
            with self._db.session() as s:
                s.add(person)
                s.flush()
                link = self._new_enrolment(s, person, now)
                self._audit.append(AuditRecord.by(
                    who, AuditEvent.PERSON_CREATE, "success",
                    object_ids={"person_id": person.id},
                    body={"handle": handle, "groups": group_list}, sensitive={"name": name},
                ), session=s)
                self._audit.append(AuditRecord.by(
                    who, AuditEvent.ENROLMENT_ISSUE, "success",
                    object_ids={"person_id": person.id}, body={"expires_at": link.expires_at},
                ), session=s)
        except IntegrityError as exc:
            raise PersonHandleTakenError(f"handle {handle!r} is taken in this tenant") from exc
        return self._view(person, ()), link

    def new_enrolment(self, who: Principal, person_id: str) -> EnrolmentLink:
        """Another one-time link for an enabled person (to add or replace a passkey)."""
        now = self._clock.now()
        with self._db.session() as s:
            person = self._person(s, who.tenant_id, person_id)
            link = self._new_enrolment(s, person, now)
            self._audit.append(AuditRecord.by(
                who, AuditEvent.ENROLMENT_ISSUE, "success", object_ids={"person_id": person.id},
                body={"expires_at": link.expires_at}), session=s)
        return link

    def _new_enrolment(self, s: Session, person: Person, now: datetime) -> EnrolmentLink:
        token = "enr_" + secrets.token_urlsafe(32)
        expires = now + timedelta(seconds=self._settings.enrolment_ttl_seconds)
        s.add(Enrolment(id=new_id("enr"), tenant_id=person.tenant_id, person_id=person.id,
                        token_hash=_hash(token), created_at=now, expires_at=expires))
        return EnrolmentLink(person.id, token, f"/enroll/{token}", expires)

    def list_people(self, who: Principal) -> list[PersonView]:
        """The tenant's people, by handle."""
        with self._db.session() as s:
            rows = s.exec(select_scoped(Person, who.tenant_id)
                          .order_by(col(Person.handle))).all()
            creds = self._credentials(s, who.tenant_id, [p.id for p in rows])
        return [self._view(p, creds.get(p.id, ())) for p in rows]

    def get_person(self, who: Principal, person_id: str) -> PersonView:
        """One person of the tenant with their passkeys."""
        with self._db.session() as s:
            row = get_scoped(s, Person, who.tenant_id, person_id, what="person")
            creds = self._credentials(s, who.tenant_id, [row.id])
        return self._view(row, creds.get(row.id, ()))

    def disable_person(self, who: Principal, person_id: str) -> PersonView:
        """Disable a person: no sign-in, no decision, no new routing; their sign-ins end."""
        now = self._clock.now()
        with self._db.session() as s:
            row = get_scoped(s, Person, who.tenant_id, person_id, what="person")
            if row.disabled_at is None:
                row.disabled_at = now
                s.add(row)
                s.execute(update(PersonSignin)
                          .where(col(PersonSignin.person_id) == row.id,
                                 col(PersonSignin.ended_at).is_(None))
                          .values(ended_at=now))
                self._audit.append(AuditRecord.by(
                    who, AuditEvent.PERSON_DISABLE, "success",
                    object_ids={"person_id": row.id}), session=s)
            creds = self._credentials(s, who.tenant_id, [row.id])
        return self._view(row, creds.get(row.id, ()))

    def revoke_credential(self, who: Principal, person_id: str, credential_row_id: str
                          ) -> PersonView:
        """Revoke one of a person's passkeys (a lost or replaced device): it can no longer
        sign in or decide, the sign-ins made with it end, and the revocation is audited, so an
        auditor's check refuses any decision it signs later.  The person's other passkeys are
        untouched.  Idempotent."""
        now = self._clock.now()
        with self._db.session() as s:
            row = get_scoped(s, Person, who.tenant_id, person_id, what="person")
            cred = s.exec(select_scoped(PersonCredential, who.tenant_id).where(
                PersonCredential.id == credential_row_id,
                PersonCredential.person_id == row.id)).first()
            if cred is None:
                raise NotFoundError("no such passkey")
            if cred.revoked_at is None:
                cred.revoked_at = now
                s.add(cred)
                s.execute(update(PersonSignin)
                          .where(col(PersonSignin.credential_row_id) == cred.id,
                                 col(PersonSignin.ended_at).is_(None))
                          .values(ended_at=now))
                self._audit.append(AuditRecord.by(
                    who, AuditEvent.CREDENTIAL_REVOKE, "success",
                    object_ids={"person_id": row.id, "credential_row_id": cred.id},
                    body={"credential_id": _b64(cred.credential_id)}), session=s)
            creds = self._credentials(s, who.tenant_id, [row.id])
        return self._view(row, creds.get(row.id, ()))

    def assign_owner(self, who: Principal, session_id: str, person_id: Any) -> str:
        """Name the person a session acts for: once, by an admin, never by the agent.

        The owner is fixed for the session's life (a conditional insert on the session id):
        a compromised agent cannot name a colluding approver, and an admin cannot move a
        session's pending requests to someone else either.
        """
        if not isinstance(person_id, str) or not person_id or len(person_id) > 40:
            raise SessionOwnerInvalidError("person_id must be a person id")
        now = self._clock.now()
        try:
            with self._db.session() as s:
                session = get_scoped(s, AgentSession, who.tenant_id, session_id,
                                     what="session")
                person = s.exec(select(Person).where(
                    Person.id == person_id, Person.tenant_id == who.tenant_id,
                    col(Person.disabled_at).is_(None))).first()
                if person is None:
                    raise SessionOwnerInvalidError(
                        "the owner must be an enabled person of this tenant")
                if s.get(SessionOwner, session.id) is not None:
                    raise SessionOwnerSetError("this session's owner is set already")
                s.add(SessionOwner(session_id=session.id, tenant_id=who.tenant_id,
                                   person_id=person.id, assigned_at=now,
                                   assigned_by=who.key_id))
                s.flush()
                self._audit.append(AuditRecord.by(
                    who, AuditEvent.SESSION_OWNER_ASSIGN, "success",
                    object_ids={"session_id": session.id, "person_id": person.id}), session=s)
        except IntegrityError as exc:
            raise SessionOwnerSetError("this session's owner is set already") from exc
        return person.id

    def owner_of(self, tenant_id: str, session_id: str) -> str | None:
        """The owner of a session, if one was assigned."""
        with self._db.session() as s:
            row = s.get(SessionOwner, session_id)
        return row.person_id if row is not None and row.tenant_id == tenant_id else None

    # ------------------------------------------------------------------ enrolment

    def _enrolment(self, s: Session, token: str, now: datetime) -> tuple[Enrolment, Person]:
        if not isinstance(token, str) or not token.startswith("enr_") or len(token) > 100:
            raise EnrolmentInvalidError("unknown enrolment link")
        row = s.exec(select(Enrolment).where(Enrolment.token_hash == _hash(token))).first()
        if row is None or row.used_at is not None or now >= row.expires_at:
            raise EnrolmentInvalidError("this enrolment link is unknown, used or expired")
        person = s.exec(select(Person).where(Person.id == row.person_id,
                                             col(Person.disabled_at).is_(None))).first()
        if person is None:
            raise EnrolmentInvalidError("this enrolment link is unknown, used or expired")
        return row, person

    def check_enrolment(self, token: str) -> None:
        """Raise ``enrolment_invalid`` unless ``token`` is a live enrolment link (read only:
        the key gate asks before it reads a body)."""
        with self._db.session() as s:
            self._enrolment(s, token, self._clock.now())

    def enrolment_options(self, token: str) -> dict[str, Any]:
        """Registration options for the enrolment page (a fresh single-use challenge)."""
        now = self._clock.now()
        with self._db.session() as s:
            _, person = self._enrolment(s, token, now)
            existing = s.exec(select(PersonCredential.credential_id).where(
                PersonCredential.person_id == person.id)).all()
            challenge = secrets.token_bytes(32)
            row = self._challenge(s, "register", challenge, now, tenant_id=person.tenant_id,
                                  person_id=person.id)
        options = registration_options(
            rp_id=self.rp_id, rp_name=self._settings.webauthn_rp_name,
            user_handle=person.user_handle, handle=person.handle, display_name=person.name,
            challenge=challenge, exclude=list(existing), timeout_ms=self._timeout_ms())
        return {"challenge_id": row.id, "publicKey": options, "name": person.name,
                "handle": person.handle}

    def register(self, token: str, challenge_id: Any, credential: Any) -> CredentialView:
        """Verify and store a passkey made on the enrolment page; the link is then used up.

        1. the link is valid; 2. the challenge is this enrolment's, unused and unexpired (it is
        used up now, whatever follows); 3. the registration verifies (origin, RP id, UV,
        challenge, format); 4. the credential id is new; 5. store, use up the link and audit
        the registration (its public key and flags: the trust anchor of its assertions).
        """
        now = self._clock.now()
        with self._db.session() as s:
            enrolment, person = self._enrolment(s, token, now)
        try:
            chal = self._use_challenge(challenge_id, "register", now,
                                       tenant_id=person.tenant_id, person_id=person.id)
            if not isinstance(credential, Mapping):
                raise PersonInvalidError("credential must be the JSON of the new passkey")
            passkey = verify_registration(credential, challenge=chal.challenge,
                                          rp_id=self.rp_id, origins=self.origins)
            row = PersonCredential(
                id=new_id("cred"), tenant_id=person.tenant_id, person_id=person.id,
                credential_id=passkey.credential_id, public_key=passkey.public_key,
                sign_count=passkey.sign_count, aaguid=passkey.aaguid,
                backup_eligible=passkey.backup_eligible, created_at=now)
            try:
                with self._db.session() as s:
                    used = _rowcount(s.execute(
                        update(Enrolment).where(col(Enrolment.id) == enrolment.id,
                                                col(Enrolment.used_at).is_(None))
                        .values(used_at=now)))
                    if used != 1:
                        raise EnrolmentInvalidError("this enrolment link was used already")
                    s.add(row)
                    s.flush()
                    self._audit.append(_person_record(
                        person.id, person.tenant_id, AuditEvent.CREDENTIAL_REGISTER, "success",
                        object_ids={"person_id": person.id, "credential_row_id": row.id},
                        body={
                            "credential_id": _b64(passkey.credential_id),
                            "public_key_cose": _b64(passkey.public_key),
                            "rp_id": self.rp_id, "origins": list(self.origins),
                            "user_handle": _b64(person.user_handle),
                            "sign_count": passkey.sign_count, "aaguid": passkey.aaguid,
                            "flags": {"uv": passkey.user_verified,
                                      "be": passkey.backup_eligible,
                                      "bs": passkey.backed_up},
                            "attestation_format": "none",
                            "client_data_json": _b64(passkey.client_data_json),
                            "attestation_object": _b64(passkey.attestation_object),
                        }), session=s)
            except IntegrityError as exc:
                raise CredentialDuplicateError("this passkey is registered already") from exc
        except SandboxSecError as exc:
            if exc.status < 500:
                with self._db.session() as s:
                    self._audit.append(_person_record(
                        person.id, person.tenant_id, AuditEvent.CREDENTIAL_REFUSE, "refused",
                        reason=exc.reason, object_ids={"person_id": person.id}), session=s)
            raise
        return _credential_view(row)

    # ------------------------------------------------------------------ sign-in

    def signin_options(self) -> dict[str, Any]:
        """Options for a passkey sign-in (discoverable: no account is named)."""
        now = self._clock.now()
        challenge = secrets.token_bytes(32)
        with self._db.session() as s:
            row = self._challenge(s, "signin", challenge, now)
        return {"challenge_id": row.id,
                "publicKey": authentication_options(rp_id=self.rp_id, challenge=challenge,
                                                    allow=(), timeout_ms=self._timeout_ms())}

    def signin(self, challenge_id: Any, credential: Any) -> SigninResult:
        """Verify a sign-in assertion and open a sign-in (the cookie value is returned once)."""
        now = self._clock.now()
        assertion = parse_assertion(credential)
        chal = self._use_challenge(challenge_id, "signin", now)
        with self._db.session() as s:
            found = self.credential_of(s, assertion.credential_id)
        if found is None:
            raise CredentialUnknownError("this passkey is not registered to anyone here")
        cred, person = found
        try:
            self.check_assertion(assertion, chal.challenge, cred, person, now)
            token = "sps_" + secrets.token_urlsafe(32)
            expires = now + timedelta(seconds=self._settings.person_session_ttl_seconds)
            signin = PersonSignin(id=new_id("psi"), tenant_id=person.tenant_id,
                                  person_id=person.id, credential_row_id=cred.id,
                                  token_hash=_hash(token), created_at=now, expires_at=expires)
            with self._db.session() as s:
                s.add(signin)
                self._audit.append(_person_record(
                    person.id, person.tenant_id, AuditEvent.SIGNIN_CREATE, "success",
                    object_ids={"person_id": person.id, "credential_row_id": cred.id,
                                "signin_id": signin.id}), session=s)
        except SandboxSecError as exc:
            if exc.status < 500:
                with self._db.session() as s:
                    self._audit.append(_person_record(
                        person.id, person.tenant_id, AuditEvent.SIGNIN_REFUSE, "refused",
                        reason=exc.reason, object_ids={"person_id": person.id,
                                                       "credential_row_id": cred.id}), session=s)
            raise
        return SigninResult(token, PersonPrincipal(person.tenant_id, person.id, person.name,
                                                   person.handle, signin.id, expires))

    def authenticate(self, token: str | None) -> PersonPrincipal:
        """The signed-in person of a sign-in cookie, or ``signin_required``."""
        if not token or not token.startswith("sps_") or len(token) > 100:
            raise SigninRequiredError("sign in with your passkey")
        now = self._clock.now()
        with self._db.session() as s:
            row = s.exec(select(PersonSignin).where(
                PersonSignin.token_hash == _hash(token))).first()
            if row is None or row.ended_at is not None or now >= row.expires_at:
                raise SigninRequiredError("your sign-in expired: sign in with your passkey")
            person = s.exec(select(Person).where(Person.id == row.person_id,
                                                 col(Person.disabled_at).is_(None))).first()
        if person is None:
            raise SigninRequiredError("sign in with your passkey")
        return PersonPrincipal(person.tenant_id, person.id, person.name, person.handle, row.id,
                               row.expires_at)

    def signout(self, token: str | None) -> None:
        """End a sign-in (idempotent)."""
        if not token:
            return
        with self._db.session() as s:
            s.execute(update(PersonSignin).where(col(PersonSignin.token_hash) == _hash(token))
                      .values(ended_at=self._clock.now()))

    # ------------------------------------------------------------------ shared by decisions

    def _challenge(self, s: Session, purpose: str, challenge: bytes, now: datetime, *,
                   tenant_id: str = "", person_id: str | None = None,
                   approval_id: str | None = None, decision: str | None = None,
                   preimage: str = "", expires_at: datetime | None = None
                   ) -> WebauthnChallenge:
        ttl = now + timedelta(seconds=self._settings.webauthn_challenge_ttl_seconds)
        # Expired challenges can only be refused; keep the table small (sign-in options are
        # handed to anyone, so rows come in at whatever rate callers ask).
        s.execute(delete(WebauthnChallenge).where(
            col(WebauthnChallenge.expires_at) < now - _CHALLENGE_KEEP))
        row = WebauthnChallenge(
            id=new_id("chl"), tenant_id=tenant_id, purpose=purpose, person_id=person_id,
            approval_id=approval_id, decision=decision, challenge=challenge,
            preimage=preimage or b64url(challenge), created_at=now,
            expires_at=min(ttl, expires_at) if expires_at is not None else ttl)
        s.add(row)
        return row

    def new_challenge(self, s: Session, purpose: str, challenge: bytes, *, tenant_id: str,
                      person_id: str, approval_id: str, decision: str, preimage: str,
                      expires_at: datetime) -> WebauthnChallenge:
        """Store a single-use decision challenge in ``s`` (see :mod:`.decisions`)."""
        return self._challenge(s, purpose, challenge, self._clock.now(), tenant_id=tenant_id,
                               person_id=person_id, approval_id=approval_id,
                               decision=decision, preimage=preimage, expires_at=expires_at)

    def _use_challenge(self, challenge_id: Any, purpose: str, now: datetime, *,
                       tenant_id: str | None = None, person_id: str | None = None,
                       approval_id: str | None = None) -> WebauthnChallenge:
        """Use up a challenge, in its own transaction: every attempt burns it (single use)."""
        with self._db.session() as s:
            row = self.pending_challenge(s, challenge_id, purpose, now, tenant_id=tenant_id,
                                         person_id=person_id, approval_id=approval_id)
            if not self.consume_challenge(s, row.id, now):
                raise AssertionReplayedError("this challenge was used already")
        return row

    @staticmethod
    def pending_challenge(s: Session, challenge_id: Any, purpose: str, now: datetime, *,
                          tenant_id: str | None = None, person_id: str | None = None,
                          approval_id: str | None = None) -> WebauthnChallenge:
        """The unused, unexpired challenge ``challenge_id`` of this purpose and owner."""
        if not isinstance(challenge_id, str) or not challenge_id or len(challenge_id) > 40:
            raise AssertionChallengeUnknownError("challenge_id must be a challenge id")
        row = s.get(WebauthnChallenge, challenge_id)
        if (row is None or row.purpose != purpose
                or (tenant_id is not None and row.tenant_id != tenant_id)
                or (person_id is not None and row.person_id != person_id)
                or (approval_id is not None and row.approval_id != approval_id)):
            raise AssertionChallengeUnknownError("no such challenge")
        if row.used_at is not None:
            raise AssertionReplayedError("this challenge was used already")
        if now >= row.expires_at:
            raise ChallengeExpiredError("the challenge expired: ask for a new one")
        return row

    @staticmethod
    def consume_challenge(s: Session, challenge_id: str, now: datetime) -> bool:
        """Mark a challenge used in ``s``; False when it was used already (one winner)."""
        won = _rowcount(s.execute(
            update(WebauthnChallenge).where(col(WebauthnChallenge.id) == challenge_id,
                                            col(WebauthnChallenge.used_at).is_(None))
            .values(used_at=now)))
        return won == 1

    @staticmethod
    def credential_of(s: Session, credential_id: bytes
                      ) -> tuple[PersonCredential, Person] | None:
        """The passkey with this raw id and its enabled person, if any
        (``credential_revoked`` for a passkey an admin revoked)."""
        cred = s.exec(select(PersonCredential).where(
            PersonCredential.credential_id == credential_id)).first()
        if cred is None:
            return None
        if cred.revoked_at is not None:
            raise CredentialRevokedError("this passkey was revoked: it signs nothing here")
        person = s.exec(select(Person).where(Person.id == cred.person_id,
                                             col(Person.disabled_at).is_(None))).first()
        return (cred, person) if person is not None else None

    def check_assertion(self, assertion: Assertion, challenge: bytes, cred: PersonCredential,
                        person: Person, now: datetime) -> int:
        """Verify ``assertion`` for ``cred`` and advance its sign counter in its own
        transaction (sign-in); decisions advance it in the vote's transaction instead."""
        count = self.verify_for(assertion, challenge, cred, person)
        with self._db.session() as s:
            self.advance_counter(s, cred, count, now)
        return count

    def verify_for(self, assertion: Assertion, challenge: bytes, cred: PersonCredential,
                   person: Person) -> int:
        """Verify ``assertion`` against ``cred`` (pure); returns the new sign count."""
        return verify_assertion(
            assertion, challenge=challenge, rp_id=self.rp_id, origins=self.origins,
            public_key=cred.public_key, stored_sign_count=cred.sign_count,
            user_handle=person.user_handle, backup_eligible=cred.backup_eligible).sign_count

    @staticmethod
    def advance_counter(s: Session, cred: PersonCredential, count: int, now: datetime) -> None:
        """Store the new sign count, conditional on it still being higher (one winner)."""
        stmt = update(PersonCredential).where(col(PersonCredential.id) == cred.id)
        if count > 0:
            # Of two concurrent uses of one counter value only one passes.
            stmt = stmt.where(col(PersonCredential.sign_count) < count)
        if _rowcount(s.execute(stmt.values(sign_count=count, last_used_at=now))) != 1:
            raise AssertionCounterError("the sign counter did not increase")

    # ------------------------------------------------------------------ helpers

    def _person(self, s: Session, tenant_id: str, person_id: str) -> Person:
        row = s.exec(select(Person).where(Person.id == person_id, Person.tenant_id == tenant_id,
                                          col(Person.disabled_at).is_(None))).first()
        if row is None:
            raise NotFoundError("no such person")
        return row

    @staticmethod
    def _credentials(s: Session, tenant_id: str, person_ids: Sequence[str]
                     ) -> dict[str, tuple[CredentialView, ...]]:
        out: dict[str, list[CredentialView]] = {}
        if not person_ids:
            return {}
        rows = s.exec(select_scoped(PersonCredential, tenant_id).where(
            col(PersonCredential.person_id).in_(list(person_ids)))
            .order_by(col(PersonCredential.created_at))).all()
        for r in rows:
            out.setdefault(r.person_id, []).append(_credential_view(r))
        return {k: tuple(v) for k, v in out.items()}

    @staticmethod
    def _view(row: Person, creds: tuple[CredentialView, ...]) -> PersonView:
        return PersonView(row.id, row.tenant_id, row.name, row.handle,
                          tuple(json.loads(row.groups_json)), row.created_at, row.disabled_at,
                          creds)


def _credential_view(r: PersonCredential) -> CredentialView:
    return CredentialView(r.id, b64url(r.credential_id), r.aaguid, r.backup_eligible,
                          r.sign_count, r.created_at, r.last_used_at, r.revoked_at)


def _valid_person(name: Any, handle: Any, groups: Any) -> tuple[str, str, list[str]]:
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 200 \
            or not name.isprintable():
        raise PersonInvalidError("name must be 1-200 printable characters")
    if not isinstance(handle, str) or not _HANDLE.fullmatch(handle):
        raise PersonInvalidError("handle must match [a-z0-9][a-z0-9_.-]{0,63}")
    if groups is None:
        groups = []
    if not isinstance(groups, list) or len(groups) > _MAX_GROUPS or not all(
            isinstance(g, str) and GROUP_NAME.fullmatch(g) for g in groups):
        raise PersonInvalidError(
            f"groups must be a list of at most {_MAX_GROUPS} names matching "
            "[a-z][a-z0-9_.-]{0,63}")
    return name.strip(), handle, sorted(set(groups))
