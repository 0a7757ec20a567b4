"""What a rule looks at: the :class:`ActionContext` of one action, built from checked input.

Pure.  The same function builds the context when an action is first decided and when it is
decided again under a changed policy (:mod:`sandboxsec.policy.redecide`), so both see exactly
the same canonical target and attributes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sandboxsec.policy.canonical import parse_amount
from sandboxsec.policy.engine import ActionContext
from sandboxsec.policy.errors import ActionInvalidError
from sandboxsec.policy.target import check_params_text, resolve_target

__all__ = ["SessionFacts", "action_context", "session_facts"]

_CURRENCY = re.compile(r"[A-Z]{3}")


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """The facts of the agent session an action runs in."""

    session_id: str
    attested: bool
    image_name: str
    image_digest: str


class _SessionRow(Protocol):
    # Read-only: a stored row or a decision's view of it (policy.repository.DecidingSession).
    @property
    def id(self) -> str: ...

    @property
    def attested(self) -> bool: ...

    @property
    def image_name(self) -> str: ...

    @property
    def image_digest(self) -> str: ...


def session_facts(row: _SessionRow) -> SessionFacts:
    """The facts of a stored session row."""
    return SessionFacts(session_id=row.id, attested=bool(row.attested),
                        image_name=row.image_name, image_digest=row.image_digest)


def action_context(*, tenant_id: str, role: str, session: SessionFacts, action: str,
                   resource: Any, params: Mapping[str, Any],
                   new_domain: bool | None = None) -> ActionContext:
    """The context of ``action`` on ``resource`` with ``params``, or a typed input error.

    1. every param name and string value displays as itself (``params_text_unsafe``);
    2. the one canonical target (:func:`~sandboxsec.policy.target.resolve_target`);
    3. amount and currency, when given, in their only spelling; a payment has both.
    """
    # 1. what the person will be shown is what is bound
    check_params_text(params)
    # 2. one canonical target
    target = resolve_target(action, resource, params)
    # 3. amount and currency
    amount = parse_amount(params["amount"]) if "amount" in params else None
    currency = params.get("currency")
    if currency is not None and (not isinstance(currency, str)
                                 or not _CURRENCY.fullmatch(currency)):
        raise ActionInvalidError("currency must be an ISO 4217 code such as \"EUR\"")
    if action == "payment" and (amount is None or currency is None):
        raise ActionInvalidError("a payment needs params.amount and params.currency")
    return ActionContext(
        tenant_id=tenant_id,
        role=role,
        session_id=session.session_id,
        attested=session.attested,
        image_name=session.image_name,
        image_digest=session.image_digest,
        action=action,
        resource=target.resource,
        amount=amount,
        currency=currency,
        app=target.attribute("app"),
        domain=target.attribute("domain"),
        payee=target.attribute("payee"),
        new_domain=new_domain,
    )
