"""Canonical targets, text that displays as itself, and values the engine never produces."""

from __future__ import annotations

import pytest

from sandboxsec.display import first_unsafe, visible
from sandboxsec.policy.context import SessionFacts, action_context
from sandboxsec.policy.engine import ActionContext, Outcome, compile_policy
from sandboxsec.policy.errors import PolicyInvalidError
from sandboxsec.policy.redecide import reconsider_grant, reconsider_pending
from sandboxsec.policy.target import canonical_domain, canonical_id, resolve_target

SESSION = SessionFacts("ses_1", True, "agent-runtime:1.4", "sha256:" + "ab" * 32)


def _ctx(action: str, resource: str, params: dict[str, object] | None = None) -> ActionContext:
    return action_context(tenant_id="tn_a", role="agent", session=SESSION, action=action,
                          resource=resource, params=params or {})


@pytest.mark.parametrize("raw", [
    "evil.example", "EVIL.EXAMPLE", "evil.example.", "Evil.Example.",
    "\uff45\uff56\uff49\uff4c.example", "evil\u3002example", "evil\uff0eexample",
    "evil\uff61example", "EVIL\u3002EXAMPLE\u3002",
])
def test_spellings_of_one_domain_have_one_form(raw: str) -> None:
    assert canonical_domain(raw) == "evil.example"


def test_idna_forms_are_one_domain() -> None:
    forms = {canonical_domain(d) for d in ("b\u00fccher.example", "B\u00dcCHER.example.",
                                           "xn--bcher-kva.example", "XN--BCHER-KVA.example")}
    assert forms == {"xn--bcher-kva.example"}
    # Japanese names mix Han and kana, and Latin may go with them (UTS #39 highly restrictive).
    assert canonical_domain("\u4f8b\u3048.\u30c6\u30b9\u30c8").startswith("xn--")


@pytest.mark.parametrize("raw", [
    "", "evil%2Eexample", "evil.example%00", " evil.example", "evil.example\t", "ev il.example",
    "evil\u200b.example", "evil.example\u202e", "p\u0430ypal.example", "ev\u0456l.example",
    "evil..example", "evil.example..", ".evil.example", "*.evil.example", "evil_x.example",
    "evil\u00a0.example", "evil\u2028.example", "a" * 64 + ".example",
])
def test_domains_without_a_canonical_form_are_refused(raw: str) -> None:
    with pytest.raises(Exception) as info:
        canonical_domain(raw)
    assert getattr(info.value, "reason", None) == "action_target_invalid"


@pytest.mark.parametrize("raw", [
    "ACME", "Acme-gmbh", "\uff41cme", "\u0430cme-gmbh", "acme gmbh", "acme%20gmbh",
    "acme\u200d", "acme\u00ad", "stra\u00dfe",
])
def test_ids_are_refused_unless_canonical(raw: str) -> None:
    with pytest.raises(Exception) as info:
        canonical_id(raw)
    assert getattr(info.value, "reason", None) == "action_target_invalid"
    assert raw not in str(info.value)  # never echoed


def test_one_target_per_action() -> None:
    assert resolve_target("payment", "iban:DE89", {"payee": "evil"}).resource == "payee:evil"
    assert resolve_target("login", "url:https://x", {"domain": "EVIL.example."}).resource == \
        "domain:evil.example"
    assert resolve_target("message", "PAYEE:evil", {}).resource == "payee:evil"
    assert resolve_target("message", "File:/tmp/X", {}).resource == "file:/tmp/X"
    assert resolve_target("message", "free text", {}).resource == "free text"
    for action, resource, params, code in (
        ("payment", "app:x", {"payee": "evil"}, "action_target_conflict"),
        ("payment", "domain:evil.example", {}, "action_target_conflict"),
        ("message", "app:x", {"payee": "evil"}, "action_target_conflict"),
        ("message", "x", {"payee": "evil", "domain": "evil.example"}, "action_target_conflict"),
        ("payment", "payee:a", {"payee": "b"}, "action_invalid"),
        ("payment", "iban:x", {}, "action_invalid"),
        ("login", "x", {}, "action_invalid"),
        ("login", "x", {"domain": 5}, "action_target_invalid"),
    ):
        with pytest.raises(Exception) as info:
            resolve_target(action, resource, params)
        assert getattr(info.value, "reason", None) == code, (action, resource, params)


def test_rules_on_the_target_hold_whatever_the_spelling() -> None:
    policy = compile_policy(
        "p, no-evil, login, domain:evil.example, true, deny\n"
        "p, no-evil-cond, *, *, domain == evil.example, deny\n"
        "p, no-evil-payee, payment, payee:evil-corp, true, deny\n"
        "p, any, *, *, true, allow\n")
    for action, resource, params in (
        ("login", "DOMAIN:EVIL.example.", {}),
        ("login", "url:x", {"domain": "\uff25VIL.example"}),
        ("payment", "iban:DE89", {"payee": "evil-corp", "amount": "1", "currency": "EUR"}),
        ("file_download", "url:x", {"domain": "evil.example."}),
    ):
        outcome, rule = policy.evaluate(_ctx(action, resource, params))
        assert outcome is Outcome.DENY and rule is not None, (action, resource, params)


@pytest.mark.parametrize("ch", [
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069",
    "\u200e", "\u200f", "\u061c", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad",
    "\u180e", "\u3164", "\u115f", "\u1160", "\uffa0", "\u2800", "\u034f", "\ufe0f",
    "\U000e0041", "\U000e0101", "\u2028", "\u2029", "\u0085", "\r", "\x0b", "\x0c", "\x00",
    "\x7f", "\u00a0", "\u2007", "\u202f", "\u3000", "\ue000", "\U0010fffd", "\ud800",
])
def test_characters_that_do_not_display_as_themselves(ch: str) -> None:
    assert first_unsafe(f"a{ch}b") == f"U+{ord(ch):04X}"
    assert first_unsafe(f"a{ch}b", allow_newlines=True) == f"U+{ord(ch):04X}"
    assert visible(f"a{ch}b") == f"a<U+{ord(ch):04X}>b"


def test_text_that_displays_as_itself() -> None:
    for text in ("acme-gmbh", "Z\u00fcrich", "\u6771\u4eac", "\U0001f4b6 refund", "a b",
                 "\u05e9\u05dc\u05d5\u05dd", "caf\u00e9"):
        assert first_unsafe(text) is None and visible(text) == text
    assert first_unsafe("line\nbreak\ttab") == "U+000A"
    assert first_unsafe("line\nbreak\ttab", allow_newlines=True) is None


@pytest.mark.parametrize("rule", [
    "p, r, login, *, domain == EVIL.example, deny",
    "p, r, login, *, domain == evil.example., deny",
    "p, r, login, *, domain == b\u00fccher.example, deny",
    "p, r, login, *, domain in evil.example|BAD.example, deny",
    "p, r, payment, *, currency == eur, deny",
    "p, r, payment, *, currency notin EUR|usd, deny",
    "p, r, payment, *, payee == ACME, deny",
    "p, r, *, *, app == Slack, deny",
    "p, r, *, *, action == Payment, deny",
    "p, r, *, *, role == Admin, deny",
    "p, r, *, *, image_digest == sha256:ABAB, deny",
    "p, r, *, *, resource == payee:ACME, deny",
    "p, r, *, *, resource == Domain:evil.example, deny",
    "p, r, login, domain:EVIL.example, true, deny",
    "p, r, login, domain:evil.example., true, deny",
    "p, r, login, domain:b\u00fccher.example, true, deny",
    "p, r, login, Domain:evil.example, true, deny",
    "p, r, login, domain:*.EVIL.example, true, deny",
    "p, r, login, domain:*.evil.example., true, deny",
    "p, r, payment, payee:ACME*, true, deny",
    "p, r, payment, PAYEE:*, true, deny",
])
def test_validator_refuses_values_the_engine_never_produces(rule: str) -> None:
    with pytest.raises(PolicyInvalidError) as info:
        compile_policy("# header\n" + rule + "\n")
    assert info.value.line == 2 and "line 2:" in info.value.message


def test_validator_accepts_canonical_values() -> None:
    compile_policy(
        "p, a, login, domain:*.evil.example, true, deny\n"
        "p, b, login, domain:xn--bcher-kva.example, true, deny\n"
        "p, c, payment, payee:acme-*, currency in EUR|USD and payee != evil, allow\n"
        "p, d, *, *, role == agent and image_digest == sha256:" + "ab" * 32 + ", deny\n"
        "p, e, *, file:/tmp/*, resource == payee:acme, deny\n")


@pytest.mark.parametrize("sep", ["\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
                                 "\u2028", "\u2029"])
def test_line_separators_other_than_newline_are_refused(sep: str) -> None:
    text = f"p, no, *, *, true, deny\n# comment{sep}p, all, *, *, true, allow\n"
    with pytest.raises(PolicyInvalidError) as info:
        compile_policy(text)
    assert info.value.line == 2
    # The same rule on a line of its own is what the separator was hiding.
    assert len(compile_policy(text.replace(sep, "\n")).rules) == 2


@pytest.mark.parametrize("ch", ["\u202e", "\u2066", "\u200b", "\ufeff", "\u00a0"])
def test_policy_text_hiding_characters_is_refused(ch: str) -> None:
    with pytest.raises(PolicyInvalidError) as info:
        compile_policy(f"p, no, *, *, true, deny\n# ok {ch} \np, a, *, *, true, allow\n")
    assert info.value.line == 2


def test_reconsidering_in_flight() -> None:
    strict = compile_policy("p, lockdown, *, *, true, deny\n")
    ask = compile_policy("p, ask, *, *, true, approval_required\n")
    loose = compile_policy("p, all, *, *, true, allow\n")
    ctx = _ctx("payment", "payee:acme", {"amount": "5", "currency": "EUR"})
    why = reconsider_pending(strict, ctx)
    assert why is not None and why.rule_id == "lockdown"
    assert reconsider_pending(ask, ctx) is None
    assert reconsider_pending(loose, ctx) is None
    for approved in (True, False):
        assert reconsider_grant(strict, ctx, approved_by_person=approved) is not None
        assert reconsider_grant(loose, ctx, approved_by_person=approved) is None
    assert reconsider_grant(ask, ctx, approved_by_person=True) is None
    assert reconsider_grant(ask, ctx, approved_by_person=False) is not None
