"""Who decides an approval request: ``route`` lines of a policy, parsed and resolved (pure).

A policy may say, for each ``approval_required`` rule, who decides and how::

    route, <rule id>, <approvers>, <quorum>, <signer>

* ``approvers``: ``owner`` (the person the session acts for), ``group:<name>`` (every person
  in that approver group), or several joined with ``|`` (the union: "owner or treasury");
  ``anyone`` is every enrolled person of the tenant.
* ``quorum``: how many distinct people must approve (1-10); one deny decides deny.
* ``signer``: ``passkey`` (only a routed person's passkey assertion counts) or ``key`` (an
  approver API key may decide too: the machine path).  A quorum above 1 needs ``passkey``.

An ``approval_required`` rule without a route line keeps the behaviour of earlier versions:
anyone of the tenant, quorum 1, approver keys allowed.  The routed people are resolved once,
when the request is created, and stored with it; later changes to groups do not move it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sandboxsec.policy.errors import PolicyInvalidError

__all__ = [
    "DEFAULT_ROUTE",
    "GROUP_NAME",
    "MAX_QUORUM",
    "Route",
    "Signer",
    "is_route_line",
    "parse_routes",
    "resolve",
]

MAX_QUORUM = 10
GROUP_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_PREFIX = "route,"


class Signer(StrEnum):
    """What may sign a decision on a routed request."""

    PASSKEY = "passkey"
    KEY = "key"


class _RuleLike(Protocol):
    @property
    def outcome(self) -> object: ...


@dataclass(frozen=True, slots=True)
class Route:
    """Who decides requests opened by one rule."""

    rule_id: str
    owner: bool
    groups: frozenset[str]
    anyone: bool
    quorum: int
    signer: Signer
    line: int = 0

    def describe(self) -> str:
        """The approvers as written in the policy (``owner|group:treasury``)."""
        parts = (["anyone"] if self.anyone else []) + (["owner"] if self.owner else [])
        return "|".join(parts + [f"group:{g}" for g in sorted(self.groups)])


#: The route of an approval_required rule the policy gives no route line.
DEFAULT_ROUTE = Route(rule_id="", owner=False, groups=frozenset(), anyone=True, quorum=1,
                      signer=Signer.KEY)


def is_route_line(line: str) -> bool:
    """True for a (stripped) policy line that is a route line."""
    return line.startswith(_PREFIX) or line == "route"


def _parse_approvers(text: str, number: int) -> tuple[bool, frozenset[str], bool]:
    owner = anyone = False
    groups: set[str] = set()
    for part in text.split("|"):
        if part == "owner":
            owner = True
        elif part == "anyone":
            anyone = True
        elif part.startswith("group:") and GROUP_NAME.fullmatch(part[6:]):
            groups.add(part[6:])
        else:
            raise PolicyInvalidError(
                f"bad approvers {part!r}: write owner, anyone or group:<name>, joined with |",
                line=number,
            )
    return owner, frozenset(groups), anyone


def parse_routes(text: str, rules: Mapping[str, _RuleLike], approval_outcome: object
                 ) -> dict[str, Route]:
    """Every route line of ``text``, checked against the policy's rules.

    A route must name an existing rule whose decision is ``approval_outcome``, at most once.
    """
    routes: dict[str, Route] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not is_route_line(line):
            continue
        tokens = [t.strip() for t in line.split(",")]
        if len(tokens) != 5:
            raise PolicyInvalidError(
                f"expected 5 fields (route, rule id, approvers, quorum, signer), "
                f"got {len(tokens)}", line=number)
        _, rule_id, approvers, quorum_text, signer_text = tokens
        rule = rules.get(rule_id)
        if rule is None:
            raise PolicyInvalidError(f"route for unknown rule {rule_id!r}", line=number)
        if rule.outcome != approval_outcome:
            raise PolicyInvalidError(
                f"rule {rule_id!r} does not require approval; only such rules have routes",
                line=number)
        if rule_id in routes:
            raise PolicyInvalidError(
                f"rule {rule_id!r} has a route already (line {routes[rule_id].line})",
                line=number)
        owner, groups, anyone = _parse_approvers(approvers, number)
        if not re.fullmatch(r"[1-9][0-9]?", quorum_text) or int(quorum_text) > MAX_QUORUM:
            raise PolicyInvalidError(f"quorum must be 1 to {MAX_QUORUM}, got {quorum_text!r}",
                                     line=number)
        try:
            signer = Signer(signer_text)
        except ValueError:
            raise PolicyInvalidError(f"signer must be passkey or key, got {signer_text!r}",
                                     line=number) from None
        quorum = int(quorum_text)
        if quorum > 1 and signer is not Signer.PASSKEY:
            raise PolicyInvalidError("a quorum above 1 counts people: its signer is passkey",
                                     line=number)
        routes[rule_id] = Route(rule_id, owner, groups, anyone, quorum, signer, number)
    return routes


def resolve(route: Route, owner_id: str | None,
            people: Iterable[tuple[str, frozenset[str]]]) -> tuple[str, ...]:
    """The ids of the people ``route`` sends a request to, sorted.

    ``people`` are the tenant's enabled people with their groups; ``owner_id`` is the session's
    owner (``None`` when the session has none: an owner-only route then reaches nobody, and the
    request can only expire or be denied).
    """
    chosen: set[str] = set()
    for person_id, groups in people:
        if route.anyone or (route.owner and person_id == owner_id) or (groups & route.groups):
            chosen.add(person_id)
    return tuple(sorted(chosen))
