"""The engine decides exactly as stock casbin does with the packaged model.

The engine evaluates the model's matcher over a tenant's rows itself (one model shared by
every tenant, see ``_ModelPlan``) instead of holding a casbin enforcer per tenant.  These tests
hand the same rules, in the documented order (deny, then approval_required, then allow, file
order within each), to an unmodified ``casbin.Enforcer`` built from the packaged model, which
parses the matcher and interprets it with simpleeval, and check that both pick the same row for
random policies and requests.  ``resMatch`` is given to casbin as an independent regular
expression, so the engine's wildcard matching is checked too.
"""

from __future__ import annotations

import gc
import re
import weakref
from decimal import Decimal
from typing import Any

import casbin
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.policy.engine import (
    ActionContext,
    CompiledPolicy,
    Outcome,
    PolicyEngine,
    _ModelPlan,
    _Request,
    bundled_model,
    compile_policy,
)
from sandboxsec.policy.errors import PolicyInvalidError

ACTIONS = ["payment", "login", "message", "file_download", "*"]
PATTERNS = ["*", "payee:acme", "payee:acme*", "payee:*", "payee:a*e", "payee:*cme", "payee:**",
            "payee:a*c*e", "payee:blocked-*", "domain:example.com", "domain:*.example.com",
            "domain:*example*", "app:mail", "app:*", "x:y"]
CONDITIONS = ["true", "amount > 100", "amount <= 50 and currency == EUR", "attested == false",
              "currency notin EUR|USD", "new_domain == true", "domain == example.com",
              "payee == acme", "role == agent", "amount >= 10.5", "app == mail",
              "domain in example.com|evil.example", "attested == true and amount < 1000"]
OUTCOMES = [o.value for o in Outcome]
RESOURCES = ["payee:acme", "payee:acmex", "payee:ace", "payee:abcde", "payee:blocked-7",
             "payee:blocked7", "payee:acm",
             "payee:", "domain:example.com", "domain:www.example.com", "domain:notexample.org",
             "app:mail", "app:chat", "x:y", "x:yy", "*", "payee:a\nc\ne"]


def reference_res_match(resource: str, pattern: str) -> bool:
    """``*`` is any run of characters (newlines too); every other character is itself."""
    regex = "".join(".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, resource, re.DOTALL) is not None


def stock_enforcer(policy: CompiledPolicy) -> casbin.Enforcer:
    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=bundled_model()))
    enforcer.add_function("resMatch", reference_res_match)
    enforcer.add_function("when", lambda req, rid: req.rules[rid].matches_condition(req.ctx))
    # The documented order, rebuilt here from the rules in file order.
    in_file_order = sorted(policy.rules, key=lambda r: r.line)
    ordered = [r for o in (Outcome.DENY, Outcome.APPROVAL_REQUIRED, Outcome.ALLOW)
               for r in in_file_order if r.outcome is o]
    rows = [[r.rule_id, r.action, r.resource, r.condition, r.outcome.value] for r in ordered]
    if rows:
        enforcer.add_named_policies("p", rows)
    return enforcer


rule_lines = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.sampled_from(PATTERNS), st.sampled_from(CONDITIONS),
              st.sampled_from(OUTCOMES)),
    max_size=12,
).map(lambda rules: "".join(f"p, r{i}, {a}, {p}, {c}, {o}\n"
                            for i, (a, p, c, o) in enumerate(rules)))

contexts = st.builds(
    ActionContext,
    tenant_id=st.just("tn_a"),
    role=st.sampled_from(["agent", "approver"]),
    session_id=st.just("ses_1"),
    attested=st.booleans(),
    image_name=st.just("agent-runtime"),
    image_digest=st.just("sha256:ab"),
    action=st.sampled_from(ACTIONS[:-1]),
    resource=st.sampled_from(RESOURCES),
    amount=st.none() | st.decimals(min_value=0, max_value=2000, places=2),
    currency=st.none() | st.sampled_from(["EUR", "USD", "XAU"]),
    app=st.none() | st.sampled_from(["mail", "chat"]),
    domain=st.none() | st.sampled_from(["example.com", "evil.example", "other.org"]),
    payee=st.none() | st.sampled_from(["acme", "bob"]),
    new_domain=st.none() | st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(text=rule_lines, ctxs=st.lists(contexts, min_size=1, max_size=6))
def test_engine_picks_the_row_stock_casbin_picks(text: str, ctxs: list[ActionContext]) -> None:
    policy = compile_policy(text)
    enforcer = stock_enforcer(policy)
    for ctx in ctxs:
        allowed, row = enforcer.enforce_ex(ctx.action, ctx.resource,
                                           _Request(ctx, {r.rule_id: r for r in policy.rules}))
        outcome, rule = policy.evaluate(ctx)
        if not row:
            assert (allowed, outcome, rule) == (False, Outcome.DENY, None)
        else:
            assert rule is not None
            assert allowed is True  # the priority effect allows on the first matching row
            assert (rule.rule_id, outcome.value) == (row[0], row[4])


@st.composite
def near_misses(draw: st.DrawFn) -> tuple[str, str]:
    """A pattern and a resource made from it: stars filled in, then maybe one character cut."""
    pattern = draw(st.text(alphabet="ab*:.-", min_size=1, max_size=6))
    fill = st.text(alphabet="ab*:.\n-", max_size=3)
    resource = "".join(draw(fill) if ch == "*" else ch for ch in pattern)
    if resource and draw(st.booleans()):
        cut = draw(st.integers(0, len(resource) - 1))
        resource = resource[:cut] + resource[cut + 1:]
    return resource, pattern


@settings(max_examples=1000)
@given(pair=near_misses() | st.tuples(st.text(alphabet="ab*:.\n-", max_size=8),
                                      st.text(alphabet="ab*:.-", min_size=1, max_size=6)))
def test_wildcard_matching_agrees_with_a_plain_regular_expression(pair: tuple[str, str]
                                                                   ) -> None:
    from sandboxsec.policy.engine import _res_match

    resource, pattern = pair
    assert _res_match(resource, pattern) is reference_res_match(resource, pattern)


def test_the_packaged_model_has_the_shape_the_engine_decides() -> None:
    plan = _ModelPlan(bundled_model())
    assert plan.r_tokens == ("r_act", "r_res", "r_ctx")
    assert plan.p_tokens == ("p_id", "p_act", "p_res", "p_cond", "p_decision")


@pytest.mark.parametrize("change,why", [
    (("priority(p.eft) || deny", "some(where (p.eft == allow))"), "priority effect"),
    (("p = id, act, res, cond, decision", "p = id, act, res, cond, decision, eft"), "p.eft"),
    (("[policy_effect]", "[role_definition]\ng = _, _\n\n[policy_effect]"), "roles"),
    (("&& when(r.ctx, p.id)", "&& eval(p.cond)"), "eval"),
])
def test_a_model_of_another_shape_is_refused_not_decided_differently(
        change: tuple[str, str], why: str) -> None:
    old, new = change
    assert old in bundled_model()
    with pytest.raises(ValueError, match=re.escape(why.split()[0])):
        PolicyEngine(model_text=bundled_model().replace(old, new)).compile(
            "p, a, *, *, true, allow\n")


def test_an_evicted_policy_is_freed_without_the_cycle_collector() -> None:
    # A compiled policy holds no reference cycle: when the cache drops it, reference counting
    # frees it at once, with the cyclic collector off.
    engine = PolicyEngine(cache_size=16)
    refs: list[weakref.ref[Any]] = []
    gc.disable()
    try:
        for i in range(40):
            text = f"p, pay-{i}, payment, payee:p{i}*, amount > {i}, deny\n"
            refs.append(weakref.ref(engine.policy_for(f"tn_{i}", 1, lambda t=text: t)))
        alive = [r for r in refs if r() is not None]
        assert len(alive) == 16
        assert all(r() is not None for r in refs[-16:])
    finally:
        gc.enable()


def test_a_line_keeps_its_own_number_and_a_refused_line_stays_refused() -> None:
    # Parsed lines are cached by text and number: the same text on another line reports
    # that line, and a refusal is not remembered as a success.
    bad = "p, r1, payment, *, amount > x, deny"
    for number in (1, 3):
        text = "\n" * (number - 1) + bad + "\n"
        for _ in range(2):
            with pytest.raises(PolicyInvalidError) as err:
                compile_policy(text)
            assert err.value.line == number
    first = compile_policy("p, a, *, *, true, allow\n").rules[0]
    second = compile_policy("# moved\np, a, *, *, true, allow\n").rules[0]
    assert (first.line, second.line) == (1, 2)


def test_a_duplicate_id_is_reported_before_the_line_is_read_further() -> None:
    # The order of the checks is the one documented in the validator: id, then action,
    # resource and condition; caching the later steps does not change which error is named.
    text = "p, r1, payment, *, true, allow\np, r1, BAD, *, true, allow\n"
    with pytest.raises(PolicyInvalidError, match="repeats line 1"):
        compile_policy(text)


def test_decisions_keep_their_rule_when_amounts_are_decimal() -> None:
    policy = compile_policy("p, big, payment, *, amount > 100, deny\n"
                            "p, any, payment, *, true, allow\n")
    ctx = ActionContext(tenant_id="tn_a", role="agent", session_id="ses_1", attested=True,
                        image_name="i", image_digest="", action="payment",
                        resource="payee:acme", amount=Decimal("100.01"))
    outcome, rule = policy.evaluate(ctx)
    assert (outcome, rule and rule.rule_id) == (Outcome.DENY, "big")


def test_long_lines_are_parsed_every_time_not_kept() -> None:
    # What the line caches hold stays bounded in bytes: a long comment or condition is read
    # on every compile instead of being kept.
    from sandboxsec.policy.engine import _cached_line_rule, _cached_line_tokens

    long_condition = " and ".join(["amount > 1"] * 40)
    text = "# " + "x" * 400 + f"\np, long, payment, *, {long_condition}, deny\n"
    before = (_cached_line_tokens.cache_info().currsize, _cached_line_rule.cache_info().currsize)
    for _ in range(2):
        policy = compile_policy(text)
    after = (_cached_line_tokens.cache_info().currsize, _cached_line_rule.cache_info().currsize)
    assert before == after
    assert [r.rule_id for r in policy.rules] == ["long"]
