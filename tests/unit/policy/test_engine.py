"""The policy engine: precedence, thresholds, unknown attributes, validation, caching."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxsec.policy.engine import (
    DEFAULT_RULE_ID,
    ActionContext,
    Outcome,
    PolicyEngine,
    bundled_default_policy,
    compile_policy,
)
from sandboxsec.policy.errors import PolicyInvalidError, PolicyTooLargeError

BASE = ActionContext(
    tenant_id="tn_a", role="agent", session_id="ses_1", attested=True,
    image_name="agent-runtime:1.4", image_digest="sha256:ab", action="payment",
    resource="payee:acme", amount=Decimal("50"), currency="EUR", payee="acme",
)


def decide(ctx: ActionContext, text: str | None = None) -> tuple[Outcome, str]:
    policy = compile_policy(text if text is not None else bundled_default_policy())
    outcome, rule = policy.evaluate(ctx)
    return outcome, rule.rule_id if rule else DEFAULT_RULE_ID


@pytest.mark.parametrize("amount,outcome,rule", [
    ("0", Outcome.DENY, DEFAULT_RULE_ID),           # not over 0: no rule allows it
    ("0.01", Outcome.APPROVAL_REQUIRED, "pay-approval"),
    ("10000", Outcome.APPROVAL_REQUIRED, "pay-approval"),   # at the limit: still approvable
    ("10000.00", Outcome.APPROVAL_REQUIRED, "pay-approval"),
    ("10000.01", Outcome.DENY, "pay-over-limit"),    # over the limit: denied
])
def test_payment_thresholds_at_the_boundary(amount: str, outcome: Outcome, rule: str) -> None:
    assert decide(replace(BASE, amount=Decimal(amount))) == (outcome, rule)


def test_unattested_sessions_may_not_pay_at_all() -> None:
    assert decide(replace(BASE, attested=False)) == (Outcome.DENY, "pay-unattested")
    assert decide(replace(BASE, attested=False, amount=Decimal("0.01")))[0] is Outcome.DENY


def test_unknown_currency_denied() -> None:
    assert decide(replace(BASE, currency="XAU")) == (Outcome.DENY, "pay-currency")


def test_login_new_domain_needs_approval_known_allowed() -> None:
    login = replace(BASE, action="login", resource="domain:bank.example", amount=None,
                    currency=None, payee=None, domain="bank.example")
    assert decide(replace(login, new_domain=True)) == (Outcome.APPROVAL_REQUIRED,
                                                       "login-new-domain")
    assert decide(replace(login, new_domain=False)) == (Outcome.ALLOW, "login-known-domain")
    # Unknown whether the domain is new: the approval rule matches, the allow rule does not.
    assert decide(replace(login, new_domain=None)) == (Outcome.APPROVAL_REQUIRED,
                                                       "login-new-domain")


def test_unlisted_action_is_denied_by_default() -> None:
    outcome, rule = decide(replace(BASE, action="shell_exec", resource="app:bash"))
    assert (outcome, rule) == (Outcome.DENY, DEFAULT_RULE_ID)


def test_deny_overrides_allow_whatever_the_order() -> None:
    text = """
p, everything, *, *, true, allow
p, nope, payment, payee:evil*, true, deny
p, ask, payment, *, amount > 100, approval_required
"""
    assert decide(replace(BASE, resource="payee:evil-corp"), text) == (Outcome.DENY, "nope")
    assert decide(replace(BASE, amount=Decimal("101")), text) == (Outcome.APPROVAL_REQUIRED,
                                                                  "ask")
    assert decide(BASE, text) == (Outcome.ALLOW, "everything")


def test_empty_policy_denies_everything() -> None:
    assert decide(BASE, "# nothing\n") == (Outcome.DENY, DEFAULT_RULE_ID)


def test_unknown_attribute_fails_closed() -> None:
    text = """
p, big, *, *, amount > 10, deny
p, ok, *, *, amount <= 10, allow
"""
    # No amount: the deny rule matches (fail closed), the allow rule could not have.
    no_amount = replace(BASE, action="message", amount=None)
    assert decide(no_amount, text) == (Outcome.DENY, "big")
    only_allow = "p, ok, *, *, amount <= 10, allow\n"
    assert decide(no_amount, only_allow) == (Outcome.DENY, DEFAULT_RULE_ID)


def test_attribute_conditions() -> None:
    text = """
p, img, *, *, image == agent-runtime:1.4 and role == agent and currency in EUR|USD, allow
"""
    assert decide(BASE, text)[0] is Outcome.ALLOW
    assert decide(replace(BASE, image_name="other:1"), text)[0] is Outcome.DENY
    assert decide(replace(BASE, currency="GBP"), text)[0] is Outcome.DENY


def test_resource_patterns() -> None:
    text = "p, r, *, payee:acme*, true, allow\n"
    assert decide(replace(BASE, resource="payee:acme-gmbh"), text)[0] is Outcome.ALLOW
    assert decide(replace(BASE, resource="payee:not-acme"), text)[0] is Outcome.DENY
    # Regex metacharacters in a pattern are literal.
    text = "p, r, *, payee:a.c, true, allow\n"
    assert decide(replace(BASE, resource="payee:abc"), text)[0] is Outcome.DENY


def test_explanation_names_rule_and_line() -> None:
    engine = PolicyEngine()
    d = engine.decide(BASE, version=3, load_text=bundled_default_policy)
    assert d.rule_id == "pay-approval"
    assert "pay-approval" in d.explanation and "line" in d.explanation
    assert d.policy_version == 3 and d.decision_id.startswith("dec_")


@pytest.mark.parametrize("text,line,fragment", [
    ("p, a, payment, *, true, allow\np, b, payment, *, amount >> 5, deny\n", 2, "condition"),
    ("p, a, payment, *, true\n", 1, "6 fields"),
    ("\n\ng, a, b\n", 3, "start with"),
    ("p, a, payment, *, true, maybe\n", 1, "decision"),
    ("p, a, payment, *, true, allow\np, a, login, *, true, allow\n", 2, "repeats line 1"),
    ("p, a, payment, *, colour == red, allow\n", 1, "unknown attribute"),
    ("p, a, payment, *, amount == lots, allow\n", 1, "decimal"),
    ("p, a, payment, *, attested > true, allow\n", 1, "operator"),
    ("p, a, Pay Ment, *, true, allow\n", 1, "bad action"),
    ("p, default-deny, payment, *, true, allow\n", 1, "reserved"),
    ("p, a b, payment, *, true, allow\n", 1, "bad rule id"),
    ("# ok\np, a, payment, *, true, allow\x00\n", 2, "control characters"),
])
def test_invalid_policy_names_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(PolicyInvalidError) as info:
        compile_policy(text)
    assert info.value.line == line
    assert info.value.reason == "policy_invalid"
    assert f"line {line}:" in info.value.message and fragment in info.value.message


def test_policy_size_limits() -> None:
    many = "".join(f"p, r{i}, payment, *, true, allow\n" for i in range(1001))
    with pytest.raises(PolicyTooLargeError):
        compile_policy(many)


def test_cache_follows_the_version() -> None:
    engine = PolicyEngine(cache_size=16)
    texts = {1: "p, a, *, *, true, allow\n", 2: "p, d, *, *, true, deny\n"}
    loads: list[int] = []

    def loader(v: int) -> str:
        loads.append(v)
        return texts[v]

    assert engine.decide(BASE, version=1, load_text=lambda: loader(1)).outcome is Outcome.ALLOW
    assert engine.decide(BASE, version=1, load_text=lambda: loader(1)).outcome is Outcome.ALLOW
    assert loads == [1]  # cached while the version holds
    assert engine.decide(BASE, version=2, load_text=lambda: loader(2)).outcome is Outcome.DENY
    assert loads == [1, 2]


def test_identical_policies_share_one_compiled_enforcer() -> None:
    engine = PolicyEngine(cache_size=16)
    text = bundled_default_policy()
    a = engine.policy_for("tn_a", 0, lambda: text)
    b = engine.policy_for("tn_b", 0, lambda: text)
    assert a is b


def test_lru_bound() -> None:
    engine = PolicyEngine(cache_size=16)
    for i in range(40):
        engine.policy_for(f"tn_{i}", 1, f"p, r{i}, *, *, true, allow\n".strip)
    assert len(engine._tenants) == 16 and len(engine._compiled) == 16


@pytest.mark.parametrize("expr", [
    "r_ctx.__class__ and True",          # attribute access
    "open(r_res)",                       # a function that is not registered
    "__import__('os')",                  # builtins are not there either
    "[x for x in r_res]",                # comprehensions
    "r_act + p_act",                     # arithmetic
])
def test_matcher_compiler_refuses_anything_outside_the_subset(expr: str) -> None:
    from sandboxsec.policy.engine import _CompiledMatcher

    with pytest.raises((ValueError, SyntaxError)):
        _CompiledMatcher(expr, {"when": lambda *_: True})


def test_matcher_compiler_matches_casbin_semantics() -> None:
    from sandboxsec.policy.engine import _CompiledMatcher

    m = _CompiledMatcher('(p_act == "*" || r_act == p_act) && !f(r_act)',
                         {"f": lambda a: a == "login"})
    assert m.eval({"p_act": "*", "r_act": "payment"}) is True
    assert m.eval({"p_act": "payment", "r_act": "payment"}) is True
    assert m.eval({"p_act": "payment", "r_act": "login"}) is False
    assert m.eval({"p_act": "*", "r_act": "login"}) is False


_policy_chars = st.sampled_from(list("p, *:|&=!<>.-_ \nabcdeflmnortuy0123456789#"))


@given(st.lists(_policy_chars, max_size=200).map("".join))
def test_policy_parser_never_fails_any_other_way(text: str) -> None:
    try:
        compile_policy(text)
    except (PolicyInvalidError, PolicyTooLargeError):
        pass


@given(st.sampled_from(["amount", "currency", "attested", "new_domain", "payee", "image"]),
       st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "notin"]),
       st.text(alphabet="abcEUR019.|-", min_size=1, max_size=12))
def test_condition_clauses_parse_or_name_their_line(attr: str, op: str, value: str) -> None:
    text = f"# header\np, r1, payment, *, {attr} {op} {value}, deny\n"
    try:
        policy = compile_policy(text)
    except PolicyInvalidError as exc:
        assert exc.line == 2
        return
    # A rule that compiled can be evaluated against any context without errors.
    policy.evaluate(BASE)
    policy.evaluate(replace(BASE, amount=None, currency=None, payee=None))


def test_cache_is_bounded_in_bytes_as_well_as_entries() -> None:
    # A few tenants with maximal policies (or an admin validating many distinct ones) cannot
    # grow a worker without limit: both caches evict by estimated size too.
    big = "".join(f"p, r{j}, payment, *, amount > {j}, deny\n" for j in range(300))
    budget = 3 * compile_policy(big).weight
    engine = PolicyEngine(cache_size=1000, max_bytes=budget)
    for i in range(12):
        engine.policy_for(f"tn_{i}", 1, (big + f"p, last{i}, *, *, true, allow\n").strip)
        engine.compile(big + f"# validated only {i}\n")
    assert 1 <= len(engine._tenants) < 3 and 1 <= len(engine._compiled) < 3
    assert engine._tenants.bytes <= budget and engine._compiled.bytes <= budget
    # the newest stays cached (no reload), even when one entry alone is over the budget
    loads: list[int] = []
    assert engine.policy_for("tn_11", 1, lambda: loads.append(1) or "") is not None
    tiny = PolicyEngine(cache_size=16, max_bytes=1)
    first = tiny.policy_for("tn_a", 1, big.strip)
    assert tiny.policy_for("tn_a", 1, lambda: loads.append(2) or "") is first
    assert loads == []


def test_tenants_sharing_a_policy_count_its_size_once() -> None:
    # Most tenants keep the default policy: one compiled policy, whatever their number, so
    # the size bound must not evict them as if each held its own copy.
    text = bundled_default_policy()
    weight = compile_policy(text).weight
    engine = PolicyEngine(cache_size=1000, max_bytes=2 * weight)
    for i in range(500):
        engine.policy_for(f"tn_{i}", 1, lambda: text)
    assert len(engine._tenants) == 500 and engine._tenants.bytes == weight
    for i in range(500):  # the same tenants move to another version of the same text
        engine.policy_for(f"tn_{i}", 2, lambda: text)
    assert len(engine._tenants) == 500 and engine._tenants.bytes == weight
    other = "p, only, *, *, true, deny\n"
    engine.policy_for("tn_0", 3, lambda: other)
    assert engine._tenants.bytes == weight + compile_policy(other).weight
