"""Passkey-signed decisions: what a signed-in person sees, and approve / deny by assertion.

A decision is a WebAuthn assertion over a server-made, single-use challenge that commits to
the approval id, its params_hash, the decision, the person and the expiry
(:func:`~sandboxsec.people.passkeys.decision_challenge`).  The assertion's exact bytes, the
challenge's preimage and the credential go into the audit entry of the vote or the decision,
so ``sandboxsec audit verify`` can re-check it offline against the logged registration.

Quorum: each routed person votes at most once (unique key); one deny decides deny; approval
needs ``quorum`` distinct people.  Concurrent votes are serialized on the request row (a
conditional update takes its lock first), so exactly one vote settles the request.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import AuditRecord, AuditSink
from sandboxsec.clock import Clock
from sandboxsec.errors import InputError, NotFoundError, SandboxSecError
from sandboxsec.ids import new_id
from sandboxsec.people.errors import (
    ApprovalAlreadyVotedError,
    ApprovalNotRoutedError,
    AssertionChallengeMismatchError,
    AssertionCredentialMismatchError,
    AssertionReplayedError,
    CredentialUnknownError,
)
from sandboxsec.people.models import ApprovalRoute, ApprovalVote, PersonCredential
from sandboxsec.people.passkeys import (
    authentication_options,
    decision_challenge,
    decision_preimage,
    parse_assertion,
)
from sandboxsec.people.routes import load_route, required_route, routed_people
from sandboxsec.people.service import PERSON_ROLE, PeopleService, PersonPrincipal
from sandboxsec.policy.approval_service import ApprovalService
from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState, check_decision
from sandboxsec.policy.keyed_audit import ParamsDigester
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.policy.quorum import tally
from sandboxsec.policy.views import ApprovalView, approval_view
from sandboxsec.storage.db import Database

__all__ = ["PersonApproval", "SignedDecisions"]

_DECISIONS = {"approve": ApprovalEvent.APPROVE, "deny": ApprovalEvent.DENY}


@dataclass(frozen=True, slots=True)
class PersonApproval:
    """A request as a routed person sees it: the request, its routing and the votes so far."""

    approval: ApprovalView
    quorum: int
    signer: str
    approvals: int
    my_vote: str | None


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def _decision(value: Any) -> ApprovalEvent:
    event = _DECISIONS.get(value) if isinstance(value, str) else None
    if event is None:
        raise InputError("decision must be approve or deny")
    return event


class SignedDecisions:
    """The signed-in person's approvals: list, detail, challenge, approve and deny."""

    def __init__(self, *, db: Database, clock: Clock, audit: AuditSink, people: PeopleService,
                 approvals: ApprovalService, digester: ParamsDigester) -> None:
        """``audit`` keys params hashes (the policy services' sink); ``digester`` makes the
        keyed params digest a decision challenge commits to."""
        self._digester = digester
        self._db = db
        self._clock = clock
        self._audit = audit
        self._people = people
        self._approvals = approvals

    # ------------------------------------------------------------------ reading

    def _routed(self, s: Session, person: PersonPrincipal, approval_id: str
                ) -> tuple[ApprovalRequest, ApprovalRoute]:
        # Not routed to this person is indistinguishable from no such request.
        row = s.exec(select(ApprovalRequest).where(
            ApprovalRequest.id == approval_id,
            ApprovalRequest.tenant_id == person.tenant_id)).first()
        route = load_route(s, person.tenant_id, approval_id) if row is not None else None
        if row is None or route is None or person.person_id not in routed_people(route):
            raise NotFoundError("no such approval")
        return row, route

    def _votes(self, s: Session, approval_id: str) -> list[ApprovalVote]:
        return list(s.exec(select(ApprovalVote).where(ApprovalVote.approval_id == approval_id)
                           .order_by(col(ApprovalVote.created_at))).all())

    def _person_view(self, s: Session, person: PersonPrincipal, row: ApprovalRequest,
                     route: ApprovalRoute, now: datetime) -> PersonApproval:
        from sandboxsec.policy.approvals import effective_state

        votes = self._votes(s, row.id)
        mine = next((v.decision for v in votes if v.person_id == person.person_id), None)
        state = effective_state(ApprovalState(row.state), row.expires_at, now)
        return PersonApproval(approval_view(row, state=state), route.quorum, route.signer,
                              sum(1 for v in votes if v.decision == "approve"), mine)

    def list_for(self, person: PersonPrincipal, *, state: ApprovalState | None =
                 ApprovalState.PENDING, limit: int = 50) -> list[PersonApproval]:
        """Requests routed to ``person``, newest first (pending ones by default)."""
        now = self._clock.now()
        # Person ids are fixed-format random tokens, so the quoted id matches exactly one
        # element of the stored JSON list.
        mine = f'%"{person.person_id}"%'
        with self._db.session() as s:
            query = (select(ApprovalRequest, ApprovalRoute)
                     .join(ApprovalRoute,
                           col(ApprovalRoute.approval_id) == col(ApprovalRequest.id))
                     .where(ApprovalRequest.tenant_id == person.tenant_id,
                            ApprovalRoute.tenant_id == person.tenant_id,
                            col(ApprovalRoute.people_json).like(mine)))
            if state is ApprovalState.PENDING:
                query = query.where(ApprovalRequest.state == state.value,
                                    col(ApprovalRequest.expires_at) > now)
            elif state is not None:
                query = query.where(ApprovalRequest.state == state.value)
            rows = s.exec(query.order_by(col(ApprovalRequest.created_at).desc(),
                                         col(ApprovalRequest.id))
                          .limit(max(1, min(limit, 200)))).all()
            return [self._person_view(s, person, r, route, now) for r, route in rows
                    if person.person_id in routed_people(route)]

    def get_for(self, person: PersonPrincipal, approval_id: str) -> PersonApproval:
        """One request routed to ``person`` (404 otherwise)."""
        now = self._clock.now()
        with self._db.session() as s:
            row, route = self._routed(s, person, approval_id)
            return self._person_view(s, person, row, route, now)

    # ------------------------------------------------------------------ challenge

    def challenge(self, person: PersonPrincipal, approval_id: str, decision: Any
                  ) -> dict[str, Any]:
        """A single-use challenge committing to this request, its params and the decision."""
        event = _decision(decision)
        now = self._clock.now()
        with self._db.session() as s:
            row, _route = self._routed(s, person, approval_id)
            # Refuse early what cannot succeed (the decision re-checks everything).
            check_decision(state=ApprovalState(row.state), event=event,
                           expires_at=row.expires_at, now=now,
                           shown_params_hash=row.params_hash, params_hash=row.params_hash)
            if s.exec(select(ApprovalVote.id).where(
                    ApprovalVote.approval_id == row.id,
                    ApprovalVote.person_id == person.person_id)).first() is not None:
                raise ApprovalAlreadyVotedError("you decided on this request already")
            creds = s.exec(select(PersonCredential.credential_id).where(
                PersonCredential.person_id == person.person_id,
                col(PersonCredential.revoked_at).is_(None))).all()
            nonce = secrets.token_bytes(32)
            keyed = self._digester.params_hmac_in(s, person.tenant_id, row.params_hash)
            preimage = decision_preimage(
                tenant_id=person.tenant_id, approval_id=row.id, params_hmac=keyed,
                decision=event.value, person_id=person.person_id, expires_at=row.expires_at,
                nonce=nonce)
            challenge = decision_challenge(preimage)
            chal = self._people.new_challenge(
                s, "decide", challenge, tenant_id=person.tenant_id,
                person_id=person.person_id, approval_id=row.id, decision=event.value,
                preimage=preimage.decode("utf-8"), expires_at=row.expires_at)
        options = authentication_options(
            rp_id=self._people.rp_id, challenge=challenge, allow=list(creds),
            timeout_ms=int(max(1.0, (chal.expires_at - now).total_seconds()) * 1000))
        # params_hash is not in the preimage (it holds the keyed value): the page compares it
        # with the hash it computes of the params it shows before asking the authenticator.
        return {"challenge_id": chal.id, "decision": event.value,
                "params_hash": row.params_hash,
                "expires_at": chal.expires_at, "preimage": chal.preimage,
                "publicKey": options}

    # ------------------------------------------------------------------ decide

    def decide(self, person: PersonPrincipal, approval_id: str, decision: Any, *,
               params_hash: Any, challenge_id: Any, credential: Any) -> PersonApproval:
        """Approve or deny by passkey assertion, checked in order:

        1. the request is routed to this person (404 otherwise);
        2. the assertion parses; the challenge is this person's for this request and this
           decision, unused and unexpired (it is used up by the vote's transaction, or by the
           refusal's: every attempt uses its challenge, once);
        3. the passkey is registered to an enabled person routed to this request, and is the
           signed-in person's own;
        4. the params_hash shown equals the request's;
        5. the assertion verifies (challenge, origin, frames, rpIdHash, UP+UV, user handle,
           flags, counter, signature);
        6. in one transaction: the request row is locked by a conditional update on
           ``pending``, this person has not voted, the vote is stored, the votes are tallied,
           and a decided request settles (grant or denial) with the assertion in the audit
           entry; an open quorum records the vote (audited with its assertion).
        Refusals are audited with their reason code and change nothing but the challenge.
        """
        event = _decision(decision)
        now = self._clock.now()
        with self._db.session() as s:
            row, route = self._routed(s, person, approval_id)  # 1.
        chal_id: str | None = None
        try:
            # 2. (the challenge is used up by the vote's transaction, or by the refusal's)
            assertion = parse_assertion(credential)
            if not isinstance(params_hash, str):
                raise InputError("params_hash must be the hash you were shown")
            with self._db.session() as s:
                chal = self._people.pending_challenge(
                    s, challenge_id, "decide", now, tenant_id=person.tenant_id,
                    person_id=person.person_id, approval_id=row.id)
                chal_id = chal.id
                # 3.
                found = self._people.credential_of(s, assertion.credential_id)
            if chal.decision != event.value:
                raise AssertionChallengeMismatchError(
                    f"this challenge is for {chal.decision}, not {event.value}")
            if found is None:
                raise CredentialUnknownError("this passkey is not registered")
            cred, owner = found
            if owner.tenant_id != person.tenant_id or owner.id not in routed_people(route):
                raise ApprovalNotRoutedError("this request is not routed to this passkey's "
                                             "person")
            if owner.id != person.person_id:
                raise AssertionCredentialMismatchError(
                    "this passkey belongs to another person than the one signed in")
            # 4.
            check_decision(state=ApprovalState.PENDING, event=event, expires_at=row.expires_at,
                           now=now, shown_params_hash=params_hash,
                           params_hash=row.params_hash)
            # 5. (the counter advances in the vote's transaction)
            count = self._people.verify_for(assertion, chal.challenge, cred, owner)
            # 6.
            self._approvals.prepare_decision()
            evidence = {
                "signer": "passkey", "person_id": person.person_id,
                "credential_row_id": cred.id, "decision": event.value,
                "challenge_preimage": chal.preimage, "webauthn": assertion.to_log(),
            }
            deferred = self._vote(who_person=person, row_id=row.id, chal_id=chal.id,
                                  cred=cred, count=count, event=event, route=route,
                                  evidence=evidence, now=now)
            if deferred is not None:
                # The policy in force now denies the request: the denial is committed, the
                # vote is not.
                raise deferred
        except SandboxSecError as exc:
            if exc.status < 500:
                with self._db.session() as s:
                    if chal_id is not None:
                        # Every attempt uses its challenge up, refused ones too.
                        self._people.consume_challenge(s, chal_id, now)
                    self._audit.append(AuditRecord(
                        event=AuditEvent.APPROVAL_REFUSE, tenant_id=person.tenant_id,
                        actor_key_id=person.person_id, actor_role=PERSON_ROLE,
                        outcome="refused", reason=exc.reason,
                        object_ids={"approval_id": row.id, "session_id": row.session_id,
                                    "person_id": person.person_id},
                        body={"attempted": event.value, "signer": "passkey"}), session=s)
            raise
        self._approvals.wakeups.notify(row.id)
        return self.get_for(person, approval_id)

    def _vote(self, *, who_person: PersonPrincipal, row_id: str, chal_id: str,
              cred: PersonCredential, count: int, event: ApprovalEvent, route: ApprovalRoute,
              evidence: Mapping[str, Any], now: datetime) -> SandboxSecError | None:
        """Store the vote and settle the request when the votes decide it.

        Returns the refusal to raise after the transaction commits when the policy in force
        now denies the request (the denial is written, the vote is not)."""
        who = who_person.as_principal()
        with self._db.session() as s:
            # The challenge first: of two submissions of one assertion exactly one goes on.
            if not self._people.consume_challenge(s, chal_id, now):
                raise AssertionReplayedError("this challenge was used already")
            # Lock the request first (a no-op update on pending): concurrent voters queue here
            # and each then sees the votes committed before it.
            locked = _rowcount(s.execute(
                update(ApprovalRequest)
                .where(col(ApprovalRequest.id) == row_id,
                       col(ApprovalRequest.tenant_id) == who.tenant_id,
                       col(ApprovalRequest.state) == ApprovalState.PENDING.value,
                       col(ApprovalRequest.expires_at) > now)
                .values(state=ApprovalState.PENDING.value)))
            row = s.exec(select(ApprovalRequest).where(ApprovalRequest.id == row_id)).one()
            if locked != 1:
                if ApprovalState(row.state) is ApprovalState.PENDING:
                    self._approvals.expire_if_due(s, who, row, now)
                check_decision(state=ApprovalState(row.state), event=event,
                               expires_at=row.expires_at, now=now,
                               shown_params_hash=row.params_hash, params_hash=row.params_hash)
            quorum = route.quorum
            if event is ApprovalEvent.APPROVE:
                # Decided again under the policy in force now: a policy that denies the
                # request denies it (votes so far count for nothing), and one that now needs
                # more people raises the quorum (never lowers it).
                denied = self._approvals.policy_refusal(s, who, row, now)
                if denied is not None:
                    return denied
                quorum, _signer = required_route(route, self._approvals.route_now(s, row))
            try:
                s.add(ApprovalVote(id=new_id("vote"), tenant_id=who.tenant_id,
                                   approval_id=row_id, person_id=who_person.person_id,
                                   credential_row_id=cred.id, decision=event.value,
                                   created_at=now))
                s.flush()
            except IntegrityError as exc:
                raise ApprovalAlreadyVotedError("you decided on this request already") from exc
            self._people.advance_counter(s, cred, count, now)
            votes = [(v.person_id, v.decision) for v in self._votes(s, row_id)]
            outcome = tally(votes, quorum)
            approvals = sum(1 for _, d in votes if d == "approve")
            extra = {**evidence, "quorum": quorum, "approvals": approvals}
            if outcome is None:
                self._audit.append(AuditRecord(
                    event=AuditEvent.APPROVAL_VOTE, tenant_id=who.tenant_id,
                    actor_key_id=who_person.person_id, actor_role=PERSON_ROLE,
                    outcome="pending", object_ids={"approval_id": row.id,
                                                   "session_id": row.session_id},
                    body={"params_hash": row.params_hash, **extra}), session=s)
                self._approvals.announce(s, row.id)
                return None
            grant_id = new_id("gr") if outcome is ApprovalState.APPROVED else None
            won = _rowcount(s.execute(
                update(ApprovalRequest)
                .where(col(ApprovalRequest.id) == row.id,
                       col(ApprovalRequest.state) == ApprovalState.PENDING.value)
                .values(state=outcome.value, decided_at=now, decided_by=who_person.person_id,
                        grant_id=grant_id)))
            if won != 1:
                from sandboxsec.policy.errors import ApprovalNotPendingError

                raise ApprovalNotPendingError("another decision on this request landed first")
            self._approvals.settle(s, who, row, outcome, now, grant_id, extra=extra,
                                   actor_role=PERSON_ROLE)
        return None

