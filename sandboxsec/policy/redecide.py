"""What a policy change does to what is in flight: pending requests and unused grants.

Pure.  An approval request and a grant were decided under the policy in force when the agent
asked.  If an admin then installs a stricter policy (say, deny everything after an incident),
a person must no longer be able to approve the request, and the downstream must no longer
accept the grant.  So each is decided again, under the policy in force *now*, at the moment
it would take effect (the approval, the grant's use), with the same context builder as the
first decision (:mod:`sandboxsec.policy.context`):

* a pending request is refused when the policy now denies it;
* a grant is refused when the policy now denies its action, and also when the policy now
  requires a person's approval but the grant was issued without one (an ``allow``), or with
  fewer people's passkeys than the route of the rule now requiring approval asks for (an
  approver key's approval counts no person).

A looser policy changes nothing in flight: a pending request still waits for its person.

Who decides is re-decided the same way, and only ever made stricter
(:func:`stricter_route`): if the policy in force now routes the request through a rule that
needs more people, or a person's passkey where the request was opened for approver keys, the
request needs that now; the people it was routed to stay the ones it was routed to when it was
made (a policy change never hands a pending request to other people).
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxsec.policy.engine import ActionContext, CompiledPolicy, Outcome, Rule
from sandboxsec.policy.routing import DEFAULT_ROUTE, Route, Signer

__all__ = ["Reconsidered", "reconsider_grant", "reconsider_pending", "route_now",
           "stricter_route"]


@dataclass(frozen=True, slots=True)
class Reconsidered:
    """Why something in flight no longer stands: the outcome now and the rule that gave it."""

    outcome: Outcome
    rule_id: str

    def explain(self, what: str, version: int) -> str:
        """A sentence for the refusal (rule ids are the tenant's own names)."""
        verb = "denies" if self.outcome is Outcome.DENY else "requires a person's approval for"
        return f"the policy in force (version {version}) now {verb} this {what} " \
               f"(rule {self.rule_id})"


def _rule_id(rule: Rule | None) -> str:
    return rule.rule_id if rule is not None else "default-deny"


def reconsider_pending(policy: CompiledPolicy, ctx: ActionContext) -> Reconsidered | None:
    """``None`` when a pending request may still be approved under ``policy``."""
    outcome, rule = policy.evaluate(ctx)
    if outcome is Outcome.DENY:
        return Reconsidered(outcome, _rule_id(rule))
    return None


def reconsider_grant(policy: CompiledPolicy, ctx: ActionContext, *, approved_by_person: bool,
                     passkeys: int | None = None) -> Reconsidered | None:
    """``None`` when a grant may still be used under ``policy``.

    ``passkeys`` is how many distinct people approved it with their passkey (``None`` when
    not known: only whether it was approved at all counts then)."""
    outcome, rule = policy.evaluate(ctx)
    if outcome is Outcome.DENY:
        return Reconsidered(outcome, _rule_id(rule))
    if outcome is Outcome.APPROVAL_REQUIRED:
        if not approved_by_person:
            return Reconsidered(outcome, _rule_id(rule))
        route = policy.routes.get(_rule_id(rule), DEFAULT_ROUTE)
        if (passkeys is not None and route.signer is Signer.PASSKEY
                and passkeys < route.quorum):
            return Reconsidered(outcome, _rule_id(rule))
    return None


def route_now(policy: CompiledPolicy, ctx: ActionContext) -> Route | None:
    """The route of the rule that requires approval of ``ctx`` under ``policy`` (``None``
    when the policy does not require approval now: it allows, or it denies)."""
    outcome, rule = policy.evaluate(ctx)
    if outcome is not Outcome.APPROVAL_REQUIRED or rule is None:
        return None
    return policy.routes.get(rule.rule_id, DEFAULT_ROUTE)


def stricter_route(quorum: int, signer: str, now: Route | None) -> tuple[int, str]:
    """The quorum and signer a pending request needs: what it was opened with, raised to what
    the policy in force now demands (never lowered)."""
    if now is None:
        return quorum, signer
    passkey = signer == Signer.PASSKEY.value or now.signer is Signer.PASSKEY
    return max(quorum, now.quorum), (Signer.PASSKEY.value if passkey else Signer.KEY.value)
