"""Grants, built from fakes of their collaborators: one exact action, usable once."""

from __future__ import annotations

import pytest

from sandboxsec.audit.events import AuditEvent as E
from sandboxsec.errors import DependencyUnavailableError
from sandboxsec.policy.approvals import ApprovalEvent, ApprovalState
from sandboxsec.policy.errors import (
    GrantAlreadyUsedError,
    GrantNotFoundError,
    GrantParamsMismatchError,
    GrantSessionEndedError,
    GrantSignatureInvalidError,
)
from tests.unit.policy.fakes import AGENT, APPROVER, OTHER_AGENT, PAYMENT, Kit, build

MESSAGE = {"text": "hi"}


@pytest.fixture
def kit() -> Kit:
    k = build()
    k.repo.add_session("ses_1")
    return k


def _allowed(kit: Kit) -> str:
    result = kit.decisions.request_action(AGENT, session_id="ses_1", action="message",
                                          resource="app:chat", params=MESSAGE)
    assert result.grant is not None
    return str(result.grant)


def _verify(kit: Kit, token: str, **over: object) -> object:
    args: dict[str, object] = {"token": token, "action": "message", "params": MESSAGE}
    args.update(over)
    who = args.pop("who", AGENT)
    return kit.grants.verify_grant(who, **args)


def test_a_grant_verifies_once(kit: Kit) -> None:
    token = _allowed(kit)
    verdict = _verify(kit, token)
    assert verdict.action == "message" and verdict.used_at == kit.clock.now()
    with pytest.raises(GrantAlreadyUsedError):
        _verify(kit, token)
    assert [(e, o) for e, o, _ in kit.audit.events()][-2:] == [
        (E.GRANT_VERIFY, "success"), (E.GRANT_REJECT, "refused")]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"params": {"text": "hi!"}}, GrantParamsMismatchError),
        ({"who": OTHER_AGENT}, GrantNotFoundError),
    ],
    ids=["altered-params", "other-tenant"],
)
def test_a_grant_for_something_else_is_refused_and_stays_usable(
        kit: Kit, change: dict[str, object], error: type[Exception]) -> None:
    token = _allowed(kit)
    with pytest.raises(error):
        _verify(kit, token, **change)
    assert kit.audit.events()[-1][0] is E.GRANT_REJECT
    _verify(kit, token)  # the real action still goes through


def test_a_tampered_token_is_refused(kit: Kit) -> None:
    token = _allowed(kit)
    head, payload, sig = token.split(".")
    forged = ".".join([head, payload, sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")])
    with pytest.raises(GrantSignatureInvalidError):
        _verify(kit, forged)


def test_an_ended_session_takes_its_grants_with_it(kit: Kit) -> None:
    token = _allowed(kit)
    kit.repo.sessions["ses_1"].ended_at = kit.clock.now()
    with pytest.raises(GrantSessionEndedError):
        _verify(kit, token)
    assert all(g.used_at is None for g in kit.repo.grants.values())


def test_using_an_approved_grant_consumes_its_approval(kit: Kit) -> None:
    r = kit.decisions.request_action(AGENT, session_id="ses_1", action="payment",
                                     resource="payee:acme-gmbh", params=PAYMENT)
    kit.approvals.decide(APPROVER, r.approval.id, ApprovalEvent.APPROVE, r.params_hash)
    token = kit.approvals.get_approval(AGENT, r.approval.id).grant
    verdict = kit.grants.verify_grant(AGENT, token=token, action="payment", params=PAYMENT,
                                      resource="payee:acme-gmbh")
    assert verdict.approval_id == r.approval.id
    assert kit.repo.approvals[r.approval.id].state == ApprovalState.CONSUMED.value
    # Once used, the grant is no longer handed out.
    assert kit.approvals.get_approval(AGENT, r.approval.id).grant is None


def test_a_failing_dependency_is_not_recorded_as_a_refusal(kit: Kit) -> None:
    token = _allowed(kit)
    before = kit.audit.events()

    def down() -> object:
        raise DependencyUnavailableError("store down")

    kit.repo.transaction = down  # type: ignore[method-assign]
    with pytest.raises(DependencyUnavailableError):
        _verify(kit, token)
    # A failure of ours is not the caller's fault: no grant_reject entry blames them.
    assert kit.audit.events() == before
