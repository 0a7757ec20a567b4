"""The decision path, built from fakes of its collaborators (the casbin engine is real)."""

from __future__ import annotations

import pytest

from sandboxsec.audit.errors import AuditUnavailableError
from sandboxsec.audit.events import AuditEvent as E
from sandboxsec.errors import NotFoundError
from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.policy.decisions import MAX_PENDING_PER_SESSION
from sandboxsec.policy.engine import Outcome
from sandboxsec.policy.errors import (
    ActionInvalidError,
    ActionSessionExpiredError,
    ApprovalPendingLimitError,
)
from sandboxsec.policy.grants import decode_grant
from sandboxsec.policy.models import PolicyRevision
from tests.unit.policy.fakes import AGENT, OTHER, OTHER_AGENT, PAYMENT, TENANT, Kit, build


@pytest.fixture
def kit() -> Kit:
    k = build()
    k.repo.add_session("ses_1")
    return k


def _pay(kit: Kit, amount: str = "125.50", session_id: str = "ses_1") -> object:
    return kit.decisions.request_action(AGENT, session_id=session_id, action="payment",
                                        resource="payee:acme-gmbh",
                                        params={**PAYMENT, "amount": amount})


def test_allow_issues_a_signed_single_action_grant_audited_with_the_decision(kit: Kit) -> None:
    result = kit.decisions.request_action(AGENT, session_id="ses_1", action="message",
                                          resource="app:chat", params={"text": "hi"})
    assert result.decision.outcome is Outcome.ALLOW and result.grant is not None
    claims = decode_grant(result.grant, kit.signer.public_keys())
    assert (claims.tenant_id, claims.session_id, claims.action, claims.params_hash) == (
        TENANT, "ses_1", "message", result.params_hash)
    assert claims.grant_id in kit.repo.grants
    assert [e for e, _, _ in kit.audit.events()] == [E.POLICY_DECISION, E.GRANT_ISSUE]
    assert kit.notifier.sent == []


def test_approval_required_opens_one_request_and_notifies_once(kit: Kit) -> None:
    first = _pay(kit)
    again = _pay(kit)
    assert first.decision.outcome is Outcome.APPROVAL_REQUIRED and first.grant is None
    assert first.approval.state is ApprovalState.PENDING and first.new_approval
    # An agent retrying asks the approver once: the same pending request answers.
    assert again.approval.id == first.approval.id and not again.new_approval
    assert len(kit.repo.approvals) == 1 and len(kit.notifier.sent) == 1
    assert kit.notifier.sent[0]["approval_id"] == first.approval.id
    assert [e for e, _, _ in kit.audit.events()] == [
        E.POLICY_DECISION, E.APPROVAL_REQUEST, E.POLICY_DECISION]


def test_a_flood_of_requests_is_refused_at_the_pending_limit(kit: Kit) -> None:
    for i in range(MAX_PENDING_PER_SESSION):
        _pay(kit, amount=f"{i + 1}.00")
    with pytest.raises(ApprovalPendingLimitError):
        _pay(kit, amount="999.00")
    assert len(kit.repo.approvals) == MAX_PENDING_PER_SESSION
    assert kit.audit.events()[-1] == (E.POLICY_DECISION, "deny", "approval_pending_limit")


@pytest.mark.parametrize("ended", [True, False], ids=["ended", "expired"])
def test_a_session_that_is_not_live_decides_nothing(kit: Kit, ended: bool) -> None:
    kit.repo.add_session("ses_old", ttl=60, ended=ended)
    kit.clock.advance(0 if ended else 61)
    with pytest.raises(ActionSessionExpiredError):
        _pay(kit, session_id="ses_old")
    assert kit.repo.approvals == {} and kit.repo.grants == {}
    assert kit.audit.events() == [(E.POLICY_DECISION, "deny", "action_session_expired")]


def test_another_tenants_session_is_not_found(kit: Kit) -> None:
    kit.repo.add_session("ses_b", tenant_id=OTHER)
    with pytest.raises(NotFoundError):
        _pay(kit, session_id="ses_b")
    with pytest.raises(NotFoundError):
        kit.decisions.request_action(OTHER_AGENT, session_id="ses_1", action="payment",
                                     resource="payee:acme-gmbh", params=PAYMENT)


def test_the_policy_version_in_force_decides(kit: Kit) -> None:
    kit.policies.texts[1] = "p, pay-never, payment, *, amount > 0, deny\n"
    kit.repo.revisions.append(PolicyRevision(
        id="pol_1", tenant_id=TENANT, version=1, text=kit.policies.texts[1], sha256="x",
        rule_count=1, created_at=kit.clock.now(), created_by="key_admin"))
    result = _pay(kit)
    assert result.decision.outcome is Outcome.DENY
    assert (result.decision.rule_id, result.decision.policy_version) == ("pay-never", 1)
    assert result.approval is None and result.grant is None


def test_resource_and_params_must_tell_one_story(kit: Kit) -> None:
    with pytest.raises(ActionInvalidError):
        kit.decisions.request_action(AGENT, session_id="ses_1", action="payment",
                                     resource="payee:someone-else", params=PAYMENT)
    assert kit.audit.events() == [] and kit.repo.transactions == 1


def test_an_audit_outage_rolls_the_decision_back(kit: Kit) -> None:
    kit.audit.down = True
    with pytest.raises(AuditUnavailableError):
        _pay(kit)
    assert kit.repo.approvals == {} and kit.notifier.sent == []


def test_a_first_login_asks_and_an_approved_domain_is_known_afterwards(kit: Kit) -> None:
    login = {"domain": "Bank.Example."}
    first = kit.decisions.request_action(AGENT, session_id="ses_1", action="login",
                                         resource="domain:bank.example", params=login)
    assert first.decision.outcome is Outcome.APPROVAL_REQUIRED
    kit.repo.remember_domain(None, TENANT, "bank.example", "ses_1", kit.clock.now())
    second = kit.decisions.request_action(AGENT, session_id="ses_1", action="login",
                                          resource="domain:bank.example", params=login)
    assert second.decision.outcome is Outcome.ALLOW and second.grant is not None
