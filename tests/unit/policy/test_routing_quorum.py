"""Route lines (who decides) and the quorum tally, pure."""

from __future__ import annotations

import pytest

from sandboxsec.policy.approvals import ApprovalState
from sandboxsec.policy.engine import bundled_default_policy, compile_policy
from sandboxsec.policy.errors import PolicyInvalidError
from sandboxsec.policy.quorum import tally
from sandboxsec.policy.routing import DEFAULT_ROUTE, Signer, resolve

BASE = ("p, pay-approval, payment, *, amount > 0, approval_required\n"
        "p, pay-deny, payment, *, amount > 5000, deny\n")


def test_default_policy_gives_payments_and_logins_to_the_owner_with_a_passkey() -> None:
    routes = compile_policy(bundled_default_policy()).routes
    assert set(routes) == {"pay-approval", "login-new-domain"}
    for route in routes.values():
        assert route.owner and not route.groups and route.signer is Signer.PASSKEY
        assert route.quorum == 1
    # Downloads keep the machine path (no route line).
    assert "download-approval" not in routes


def test_route_line_parses() -> None:
    text = BASE + "route, pay-approval, owner|group:treasury|group:risk, 2, passkey\n"
    route = compile_policy(text).routes["pay-approval"]
    assert route.owner and route.groups == {"treasury", "risk"} and route.quorum == 2
    assert route.describe() == "owner|group:risk|group:treasury"


@pytest.mark.parametrize(("line", "says"), [
    ("route, nope, owner, 1, passkey", "unknown rule"),
    ("route, pay-deny, owner, 1, passkey", "does not require approval"),
    ("route, pay-approval, owner, 0, passkey", "quorum"),
    ("route, pay-approval, owner, 11, passkey", "quorum"),
    ("route, pay-approval, owner, 01, passkey", "quorum"),
    ("route, pay-approval, owner, 2, key", "counts people"),
    ("route, pay-approval, owner, 1, password", "signer"),
    ("route, pay-approval, boss, 1, passkey", "bad approvers"),
    ("route, pay-approval, group:Treasury, 1, passkey", "bad approvers"),
    ("route, pay-approval, owner, 1", "5 fields"),
    ("route", "5 fields"),
])
def test_bad_route_lines_are_refused_with_the_line(line: str, says: str) -> None:
    with pytest.raises(PolicyInvalidError) as err:
        compile_policy(BASE + line + "\n")
    assert says in err.value.message and err.value.line == 3


def test_a_rule_has_one_route() -> None:
    text = BASE + "route, pay-approval, owner, 1, passkey\nroute, pay-approval, anyone, 1, key\n"
    with pytest.raises(PolicyInvalidError) as err:
        compile_policy(text)
    assert err.value.line == 4 and "line 3" in err.value.message


def test_resolve_owner_groups_and_anyone() -> None:
    people = [("per_a", frozenset()), ("per_b", frozenset({"treasury"})),
              ("per_c", frozenset({"sales"}))]
    route = compile_policy(BASE + "route, pay-approval, owner|group:treasury, 2, passkey\n"
                           ).routes["pay-approval"]
    assert resolve(route, "per_a", people) == ("per_a", "per_b")
    assert resolve(route, None, people) == ("per_b",)
    assert resolve(route, "per_x", people) == ("per_b",)  # an owner who is not (or no longer)
    assert resolve(DEFAULT_ROUTE, None, people) == ("per_a", "per_b", "per_c")
    owner_only = compile_policy(bundled_default_policy()).routes["pay-approval"]
    assert resolve(owner_only, None, people) == ()


def test_tally() -> None:
    assert tally([], 1) is None
    assert tally([("a", "approve")], 1) is ApprovalState.APPROVED
    assert tally([("a", "approve")], 2) is None
    assert tally([("a", "approve"), ("b", "approve")], 2) is ApprovalState.APPROVED
    # The same person counted once, whatever the store let through.
    assert tally([("a", "approve"), ("a", "approve")], 2) is None
    # One deny decides, even after approvals.
    assert tally([("a", "approve"), ("b", "deny")], 2) is ApprovalState.DENIED
    assert tally([("a", "approve"), ("b", "approve"), ("c", "deny")], 2) is \
        ApprovalState.DENIED
    with pytest.raises(ValueError):
        tally([("a", "maybe")], 1)
    with pytest.raises(ValueError):
        tally([], 0)
