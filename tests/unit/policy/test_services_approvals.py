"""Approvals, built from fakes of their collaborators: the approver decides what they saw, once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sandboxsec.audit.events import AuditEvent as E
from sandboxsec.errors import NotFoundError
from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState
from sandboxsec.policy.errors import (
    ApprovalExpiredError,
    ApprovalHashMismatchError,
    ApprovalNotPendingError,
)
from sandboxsec.policy.grants import decode_grant
from sandboxsec.principal import Principal, Role
from tests.unit.policy.fakes import (
    AGENT,
    APPROVER,
    PAYMENT,
    TENANT,
    InMemoryPolicyRepository,
    Kit,
    build,
)

OTHER_APPROVER = Principal("tn_b", "key_b_approver", Role.APPROVER)


@pytest.fixture
def kit() -> Kit:
    k = build()
    k.repo.add_session("ses_1")
    return k


def _request(kit: Kit) -> tuple[str, str]:
    r = kit.decisions.request_action(AGENT, session_id="ses_1", action="payment",
                                     resource="payee:acme-gmbh", params=PAYMENT)
    return r.approval.id, r.params_hash


def test_approving_what_was_shown_issues_the_grant_only_to_the_agent_that_asked(kit: Kit) -> None:
    aid, shown = _request(kit)
    view = kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, shown)
    assert view.state is ApprovalState.APPROVED and view.decided_by == APPROVER.key_id
    assert [e for e, _, _ in kit.audit.events()][-2:] == [E.APPROVAL_APPROVE, E.GRANT_ISSUE]
    as_agent = kit.approvals.get_approval(AGENT, aid)
    assert as_agent.grant is not None
    claims = decode_grant(as_agent.grant, kit.signer.public_keys())
    assert (claims.approval_id, claims.params_hash) == (aid, shown)
    # The approver reads the request but never lifts its grant; another agent key neither.
    assert kit.approvals.get_approval(APPROVER, aid).grant is None
    other_agent = Principal(TENANT, "key_agent_2", Role.AGENT)
    assert kit.approvals.get_approval(other_agent, aid).grant is None


def test_a_different_hash_than_the_request_is_refused_and_audited(kit: Kit) -> None:
    aid, _ = _request(kit)
    with pytest.raises(ApprovalHashMismatchError):
        kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, "0" * 64)
    assert kit.repo.approvals[aid].state == ApprovalState.PENDING.value
    assert kit.repo.grants == {}
    assert kit.audit.events()[-1] == (E.APPROVAL_REFUSE, "refused", "approval_params_mismatch")


def test_an_expired_request_is_refused_and_its_expiry_written(kit: Kit) -> None:
    aid, shown = _request(kit)
    kit.clock.advance(601)
    with pytest.raises(ApprovalExpiredError):
        kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, shown)
    assert kit.repo.approvals[aid].state == ApprovalState.EXPIRED.value
    assert [e for e, _, _ in kit.audit.events()][-2:] == [E.APPROVAL_EXPIRE, E.APPROVAL_REFUSE]
    assert aid in kit.repo.announced


def test_the_second_decision_is_refused(kit: Kit) -> None:
    aid, shown = _request(kit)
    kit.approvals.decide(APPROVER, aid, ApprovalEvent.DENY, shown)
    with pytest.raises(ApprovalNotPendingError):
        kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, shown)
    assert kit.repo.approvals[aid].state == ApprovalState.DENIED.value
    assert kit.repo.grants == {}


class _RacingRepository(InMemoryPolicyRepository):
    """Another approver's decision lands between our read and our conditional update."""

    def decide_approval(self, tx, tenant_id, approval_id, state, now, decided_by,  # type: ignore[no-untyped-def]
                        grant_id):
        super().decide_approval(tx, tenant_id, approval_id, ApprovalState.DENIED, now,
                                "key_other", None)
        return super().decide_approval(tx, tenant_id, approval_id, state, now, decided_by,
                                       grant_id)


def test_of_two_concurrent_decisions_the_loser_is_refused_and_issues_no_grant() -> None:
    kit = build()
    racing = _RacingRepository()
    racing.add_session("ses_1")
    kit.repo = racing
    kit.grants._repo = kit.approvals._repo = kit.decisions._repo = racing
    aid, shown = _request(kit)
    with pytest.raises(ApprovalNotPendingError):
        kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, shown)
    assert racing.approvals[aid].state == ApprovalState.DENIED.value
    assert racing.grants == {}
    assert kit.audit.events()[-1] == (E.APPROVAL_REFUSE, "refused", "approval_not_pending")


def test_another_tenants_approver_cannot_see_or_decide(kit: Kit) -> None:
    aid, shown = _request(kit)
    with pytest.raises(NotFoundError):
        kit.approvals.get_approval(OTHER_APPROVER, aid)
    with pytest.raises(NotFoundError):
        kit.approvals.decide(OTHER_APPROVER, aid, ApprovalEvent.APPROVE, shown)
    assert kit.repo.approvals[aid].state == ApprovalState.PENDING.value


def test_lists_show_states_as_of_now(kit: Kit) -> None:
    aid, _ = _request(kit)
    assert [v.id for v in kit.approvals.list_approvals(APPROVER, state=ApprovalState.PENDING)
            ] == [aid]
    kit.clock.advance(601)
    assert kit.approvals.list_approvals(APPROVER, state=ApprovalState.PENDING) == []
    listed = kit.approvals.list_approvals(APPROVER, state=ApprovalState.EXPIRED)
    assert [(v.id, v.state, v.grant) for v in listed] == [(aid, ApprovalState.EXPIRED, None)]


def test_a_waiting_agent_wakes_on_the_decision(kit: Kit) -> None:
    aid, shown = _request(kit)
    seen = []
    subscribed = threading.Event()

    async def wait() -> None:
        task = asyncio.create_task(kit.approvals.wait(AGENT, aid, 5.0))
        while kit.approvals.wakeups.waiting() == 0:
            await asyncio.sleep(0.01)
        subscribed.set()
        seen.append(await task)

    waiter = threading.Thread(target=lambda: asyncio.run(wait()))
    waiter.start()
    assert subscribed.wait(5)
    kit.approvals.decide(APPROVER, aid, ApprovalEvent.APPROVE, shown)
    waiter.join(5)
    assert seen and seen[0].state is ApprovalState.APPROVED and seen[0].grant is not None
