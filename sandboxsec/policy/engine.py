"""The action policy engine: tenant policies on one casbin model, three outcomes, one rule.

Pure: :func:`compile_policy` turns policy text into a :class:`CompiledPolicy` (or raises
:class:`PolicyInvalidError` naming the failing line), and :class:`PolicyEngine` decides an
:class:`ActionContext` against a tenant's compiled policy.  Storage of the policy text and of
its version lives in :mod:`sandboxsec.policy.service`; the engine is told the current version
on each decision and recompiles only when it changed.

Why per tenant: one casbin enforcer scans every row on every decision, so one enforcer over all
tenants costs time linear in the total rule count.  A tenant's own rows cost the same at
10,000 tenants as at one.  casbin reads the model once and every tenant's rows are decided
against that one model (:class:`_ModelPlan`); a compiled policy is only validated rules and
rows of strings, small, free of reference cycles and cheap to compile again.  Compiled policies
are shared between tenants whose policy text is identical (most tenants keep the default), and
both caches are bounded LRUs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from importlib import resources
from typing import Any

import casbin
from casbin.effect import get_effector
from casbin.effect.default_effectors import PriorityEffector
from casbin.util import has_eval

from sandboxsec.policy.canonical import parse_amount
from sandboxsec.policy.errors import AmountInvalidError, PolicyInvalidError, PolicyTooLargeError
from sandboxsec.policy.routing import Route, is_route_line, parse_routes
from sandboxsec.policy.rulevalues import check_line, check_resource_pattern, check_str_value

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_RULE_ID",
    "MAX_POLICY_BYTES",
    "MAX_RULES",
    "ActionContext",
    "CompiledPolicy",
    "Decision",
    "Outcome",
    "PolicyEngine",
    "Rule",
    "bundled_default_policy",
    "bundled_model",
    "compile_policy",
]

#: The rule id reported when no rule matched (default deny).
DEFAULT_RULE_ID = "default-deny"
MAX_POLICY_BYTES = 256 * 1024
MAX_RULES = 1000


class Outcome(StrEnum):
    """What a decision says.  Ordered by precedence: deny beats approval beats allow."""

    DENY = "deny"
    APPROVAL_REQUIRED = "approval_required"
    ALLOW = "allow"


_PRECEDENCE = {Outcome.DENY: 0, Outcome.APPROVAL_REQUIRED: 1, Outcome.ALLOW: 2}


@functools.cache
def bundled_model() -> str:
    """The casbin model text shipped with the package (``policy/data/model.conf``)."""
    return resources.files("sandboxsec.policy").joinpath("data/model.conf").read_text("utf-8")


@functools.cache
def bundled_default_policy() -> str:
    """The default policy shipped with the package (``policy/data/default.csv``)."""
    return resources.files("sandboxsec.policy").joinpath("data/default.csv").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class ActionContext:
    """Everything a rule may look at for one requested action.

    ``None`` means "not known for this action" (a login has no amount).  Conditions on an
    unknown attribute fail closed: they match in deny and approval_required rules and do not
    match in allow rules.
    """

    tenant_id: str
    role: str
    session_id: str
    attested: bool
    image_name: str
    image_digest: str
    action: str
    resource: str
    amount: Decimal | None = None
    currency: str | None = None
    app: str | None = None
    domain: str | None = None
    payee: str | None = None
    new_domain: bool | None = None

    def attribute(self, name: str) -> Any:
        return _ATTRIBUTES[name][1](self)


# name -> (type, getter).  Types: "bool", "decimal", "str".
_ATTRIBUTES: dict[str, tuple[str, Callable[[ActionContext], Any]]] = {
    "role": ("str", lambda c: c.role),
    "session": ("str", lambda c: c.session_id),
    "attested": ("bool", lambda c: c.attested),
    "image": ("str", lambda c: c.image_name or None),
    "image_digest": ("str", lambda c: c.image_digest or None),
    "action": ("str", lambda c: c.action),
    "resource": ("str", lambda c: c.resource),
    "app": ("str", lambda c: c.app),
    "domain": ("str", lambda c: c.domain),
    "payee": ("str", lambda c: c.payee),
    "amount": ("decimal", lambda c: c.amount),
    "currency": ("str", lambda c: c.currency),
    "new_domain": ("bool", lambda c: c.new_domain),
}

_OPS_BY_TYPE = {
    "bool": {"==", "!="},
    "decimal": {"==", "!=", "<", "<=", ">", ">="},
    "str": {"==", "!=", "in", "notin"},
}
_CLAUSE = re.compile(r"\s*([a-z_]+)\s*(==|!=|<=|>=|<|>|\bnotin\b|\bin\b)\s*(\S+)\s*")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_ACTION = re.compile(r"\*|[a-z][a-z0-9_.-]{0,63}")
_RESOURCE_PATTERN = re.compile(r"[^\s,]{1,256}")
_STR_VALUE = re.compile(r"[^\s,|]{1,256}")


@dataclass(frozen=True, slots=True)
class _Clause:
    attribute: str
    op: str
    value: Any

    def eval(self, ctx: ActionContext) -> bool | None:
        actual = ctx.attribute(self.attribute)
        if actual is None:
            return None
        op, want = self.op, self.value
        if op == "==":
            return bool(actual == want)
        if op == "!=":
            return bool(actual != want)
        if op == "in":
            return actual in want
        if op == "notin":
            return actual not in want
        if op == "<":
            return bool(actual < want)
        if op == "<=":
            return bool(actual <= want)
        if op == ">":
            return bool(actual > want)
        return bool(actual >= want)


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule.  ``line`` is its line number in the policy text."""

    rule_id: str
    action: str
    resource: str
    condition: str
    outcome: Outcome
    line: int
    clauses: tuple[_Clause, ...] = field(repr=False, compare=False)

    def matches_condition(self, ctx: ActionContext) -> bool:
        """True when every clause holds; an unknown attribute fails closed (see ActionContext)."""
        unknown = False
        for clause in self.clauses:
            result = clause.eval(ctx)
            if result is False:
                return False
            if result is None:
                unknown = True
        return not unknown or self.outcome is not Outcome.ALLOW

    def explain(self) -> str:
        return (
            f"rule {self.rule_id} (line {self.line}): {self.outcome.value} "
            f"{self.action} on {self.resource} when {self.condition}"
        )


def _parse_value(attr: str, attr_type: str, op: str, raw: str, line: int) -> Any:
    if attr_type == "bool":
        if raw not in ("true", "false"):
            raise PolicyInvalidError(f"expected true or false, got {raw!r}", line=line)
        return raw == "true"
    if attr_type == "decimal":
        try:
            return parse_amount(raw)
        except AmountInvalidError:
            raise PolicyInvalidError(f"expected a decimal number, got {raw!r}", line=line) from None
    if op in ("in", "notin"):
        items = raw.split("|")
        if not all(_STR_VALUE.fullmatch(i) for i in items):
            raise PolicyInvalidError(f"bad value list {raw!r} (use A|B|C)", line=line)
        for item in items:
            check_str_value(attr, item, line)
        return frozenset(items)
    if not _STR_VALUE.fullmatch(raw):
        raise PolicyInvalidError(f"bad value {raw!r}", line=line)
    check_str_value(attr, raw, line)
    return raw


def _parse_condition(text: str, line: int) -> tuple[_Clause, ...]:
    if text == "true":
        return ()
    clauses = []
    for part in re.split(r"\s+and\s+|\s*&&\s*", text):
        m = _CLAUSE.fullmatch(part)
        if m is None:
            raise PolicyInvalidError(
                f"cannot read condition {part.strip()!r}: write <attribute> <op> <value>, "
                "joined with 'and'",
                line=line,
            )
        attr, op, raw = m.groups()
        if attr not in _ATTRIBUTES:
            raise PolicyInvalidError(
                f"unknown attribute {attr!r} (known: {', '.join(sorted(_ATTRIBUTES))})", line=line
            )
        attr_type = _ATTRIBUTES[attr][0]
        if op not in _OPS_BY_TYPE[attr_type]:
            raise PolicyInvalidError(
                f"operator {op!r} does not apply to {attr_type} attribute {attr!r}", line=line
            )
        clauses.append(_Clause(attr, op, _parse_value(attr, attr_type, op, raw, line)))
    return tuple(clauses)


# Parsing a line depends on nothing but the line and its number, and its results are
# immutable, so both steps below are cached: tenants' policies mostly repeat the same lines
# (the default policy, a shared template with a few thresholds changed), and a policy
# evicted from the engine's cache compiles again in a few microseconds.  Refusals are
# exceptions, which are never cached.  Bounded in entries, and only lines up to
# _CACHED_LINE_CHARS are cached, so what the caches hold is bounded in bytes too (long
# comment or condition lines parse every time); a tenant writing many distinct lines only
# costs recompiles.
_LINE_CACHE = 16384
_CACHED_LINE_CHARS = 256


def _line_tokens(raw_line: str, number: int) -> tuple[str, ...] | None:
    """:func:`_read_line`, cached for short lines."""
    if len(raw_line) <= _CACHED_LINE_CHARS:
        return _cached_line_tokens(raw_line, number)
    return _read_line(raw_line, number)


def _line_rule(tokens: tuple[str, ...], number: int) -> Rule:
    """:func:`_read_rule`, cached for the rules of short lines."""
    if sum(map(len, tokens)) <= _CACHED_LINE_CHARS:
        return _cached_line_rule(tokens, number)
    return _read_rule(tokens, number)


def _read_line(raw_line: str, number: int) -> tuple[str, ...] | None:
    """The six fields of a rule line; ``None`` for a blank, comment or route line."""
    check_line(raw_line, number)
    line = raw_line.strip()
    if not line or line.startswith("#") or is_route_line(line):
        # Route lines say who decides; sandboxsec.policy.routing reads them.
        return None
    tokens = tuple(t.strip() for t in line.split(","))
    if tokens[0] != "p":
        raise PolicyInvalidError("rules start with 'p,'", line=number)
    if len(tokens) != 6:
        raise PolicyInvalidError(
            f"expected 6 fields (p, id, action, resource, condition, decision), "
            f"got {len(tokens)}",
            line=number,
        )
    return tokens


def _read_rule(tokens: tuple[str, ...], number: int) -> Rule:
    """The rule of a line whose id was checked (steps 2 and 3 of :func:`_parse_rules`)."""
    _, rule_id, action, resource, condition, decision = tokens
    # 2. action and resource pattern
    if not _ACTION.fullmatch(action):
        raise PolicyInvalidError(f"bad action {action!r}", line=number)
    if not _RESOURCE_PATTERN.fullmatch(resource):
        raise PolicyInvalidError(f"bad resource pattern {resource!r}", line=number)
    check_resource_pattern(resource, number)
    if "*" in resource.rstrip("*") or resource.count("*") > 1:
        _pattern_regex(resource)  # compiled now, not on the tenant's first decision
    # 3. condition and decision
    clauses = _parse_condition(condition, number)
    try:
        outcome = Outcome(decision)
    except ValueError:
        raise PolicyInvalidError(
            f"decision must be allow, deny or approval_required, got {decision!r}",
            line=number,
        ) from None
    return Rule(rule_id, action, resource, condition, outcome, number, clauses)


_cached_line_tokens = functools.lru_cache(maxsize=_LINE_CACHE)(_read_line)
_cached_line_rule = functools.lru_cache(maxsize=_LINE_CACHE)(_read_rule)


def _parse_rules(text: str) -> list[Rule]:
    if len(text.encode("utf-8")) > MAX_POLICY_BYTES:
        raise PolicyTooLargeError(f"policy text is larger than {MAX_POLICY_BYTES} bytes")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    # Split on \n only: any other separator is refused on its line (check_line), so no rule
    # can hide inside what an editor shows as a comment.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        tokens = _line_tokens(raw_line, number)
        if tokens is None:
            continue
        rule_id = tokens[1]
        # 1. the id names the rule in every decision, so it must be unique and readable
        if not _RULE_ID.fullmatch(rule_id):
            raise PolicyInvalidError(f"bad rule id {rule_id!r}", line=number)
        if rule_id == DEFAULT_RULE_ID:
            raise PolicyInvalidError(f"rule id {DEFAULT_RULE_ID!r} is reserved", line=number)
        if rule_id in seen:
            raise PolicyInvalidError(
                f"rule id {rule_id!r} repeats line {seen[rule_id]}", line=number
            )
        seen[rule_id] = number
        rules.append(_line_rule(tokens, number))
        if len(rules) > MAX_RULES:
            raise PolicyTooLargeError(f"a policy holds at most {MAX_RULES} rules")
    return rules


@functools.lru_cache(maxsize=65536)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")), re.DOTALL)


def _res_match(resource: str, pattern: str) -> bool:
    """``resMatch`` of the model: ``*`` matches any run of characters, nothing else is special."""
    stars = pattern.count("*")
    if stars == 0:
        return resource == pattern
    if stars == 1 and pattern[-1] == "*":
        # The common shape (``payee:blocked-*``) without a regular expression: compiling one
        # for each tenant's distinct pattern cost more than a whole decision.
        return resource.startswith(pattern[:-1])
    return _pattern_regex(pattern).fullmatch(resource) is not None


@dataclass(frozen=True, slots=True)
class _Request:
    """What ``r.ctx`` carries into the matcher: the context and the rules it is checked against."""

    ctx: ActionContext
    rules: Mapping[str, Rule]


def _when(request: _Request, rule_id: str) -> bool:
    """``when`` of the model: the rule's condition holds for the request's context."""
    return request.rules[rule_id].matches_condition(request.ctx)


# The node types the model's matcher may use: boolean logic, equality and calls of the
# registered functions on request and policy fields.  Nothing else (no attributes, subscripts,
# arithmetic or lambdas) is compiled.
_MATCHER_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not,
                  ast.Compare, ast.Eq, ast.NotEq, ast.Call, ast.Name, ast.Load, ast.Constant)


class _CompiledMatcher:
    """The model's matcher compiled to Python bytecode once, instead of interpreted per row.

    casbin hands ``_get_expression`` the matcher with fields renamed (``r.act`` as ``r_act``),
    rewrites ``&&``/``||``/``!`` to Python and interprets it with simpleeval for every policy
    row, which costs several microseconds a row.  The matcher comes from the packaged model file,
    never from a request or a tenant's policy, and is checked to hold only the node types in
    ``_MATCHER_NODES`` and calls of registered functions before it is compiled; it runs with
    no builtins.  Tenants' conditions are parsed by this module, not evaluated as code.
    """

    def __init__(self, expr: str, functions: Mapping[str, Any]) -> None:
        # The same rewriting casbin applies before interpreting: && || ! to Python.
        expr = re.sub(r"!(?!=)", "not ", expr.replace("&&", "and").replace("||", "or"))
        tree = ast.parse(expr.strip(), mode="eval")
        for node in ast.walk(tree):
            if not isinstance(node, _MATCHER_NODES):
                raise ValueError(f"matcher uses {type(node).__name__}")
            if isinstance(node, ast.Call) and not (
                isinstance(node.func, ast.Name) and node.func.id in functions
            ):
                raise ValueError("matcher calls an unregistered function")
        self._code = compile(tree, "<policy matcher>", "eval")
        self._globals: dict[str, Any] = {"__builtins__": {}, **functions}

    def eval(self, names: dict[str, Any]) -> Any:
        return eval(self._code, self._globals, names)  # noqa: S307 - see the class docstring


class _ModelPlan:
    """The casbin model, read by casbin once and shared by every tenant's policy.

    casbin parses the model text (request and policy tokens, matcher, effect); the matcher is
    compiled once (:class:`_CompiledMatcher`).  :meth:`first_match` then does what casbin's
    ``enforce_ex`` does for this model's shape, over one tenant's rows: the matcher is
    evaluated row by row with the same names casbin binds (``r_act``, ``p_id``...), and with
    the priority effect and no ``p_eft`` column the first row it holds for decides.  A model
    of another shape (another effect, a ``p_eft`` column, roles, ``eval()``) is refused here
    rather than decided differently.  Sharing the plan is what keeps a tenant's compiled
    policy small and quick to build: a casbin enforcer per tenant cost about 66 objects the
    cyclic garbage collector tracks (rescanned by every full collection) and several hundred
    microseconds to build on a cache miss, against about 9 objects and tens of microseconds
    now (``tests/unit/policy/test_engine_casbin_differential.py`` checks the decisions
    against stock casbin).
    """

    def __init__(self, model_text: str) -> None:
        model = casbin.Enforcer.new_model(text=model_text)
        if "g" in model.keys():
            raise ValueError("the policy model may not define roles (g)")
        r_tokens = tuple(model["r"]["r"].tokens)
        p_tokens = tuple(model["p"]["p"].tokens)
        if "p_eft" in p_tokens:
            raise ValueError("the policy model may not carry a p.eft column")
        if not isinstance(get_effector(model["e"]["e"].value), PriorityEffector):
            raise ValueError("the policy model must use the priority effect")
        expr = model["m"]["m"].value
        if has_eval(expr):
            raise ValueError("the policy model's matcher may not use eval()")
        self.r_tokens = r_tokens
        self.p_tokens = p_tokens
        self.matcher = _CompiledMatcher(expr, {"resMatch": _res_match, "when": _when})

    def first_match(self, rows: tuple[tuple[str, ...], ...], *rvals: Any
                    ) -> tuple[str, ...] | None:
        """The first row the matcher holds for (``None``: none does, casbin's default deny).

        With no rows at all casbin evaluates the matcher once on blank policy fields; for this
        model that can only hold for an empty action, which no request carries (actions are
        validated), so no rows is a deny here without asking.
        """
        if len(rvals) != len(self.r_tokens):
            raise RuntimeError("invalid request size")
        names = dict(zip(self.r_tokens, rvals, strict=True))
        p_tokens, matcher = self.p_tokens, self.matcher
        for row in rows:
            names.update(zip(p_tokens, row, strict=True))
            result = matcher.eval(names)
            if result is True:
                return row
            if result is not False:
                raise RuntimeError("matcher result should be bool")
        return None


@functools.lru_cache(maxsize=8)
def _plan(model_text: str) -> _ModelPlan:
    return _ModelPlan(model_text)


class CompiledPolicy:
    """A validated policy and its rows for the shared casbin model.  Immutable once built;
    safe to share.

    It holds no reference cycle, so an entry evicted from the engine's cache is freed at
    once by reference counting, and its rows are tuples of strings, which the cyclic garbage
    collector does not track.
    """

    __slots__ = ("__weakref__", "_by_id", "_plan", "_rows", "routes", "rules", "sha256", "text",
                 "weight")

    def __init__(self, text: str, model_text: str) -> None:
        self.text = text
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        parsed = _parse_rules(text)
        # Deny, then approval_required, then allow; file order within each (sorted is stable).
        self.rules: tuple[Rule, ...] = tuple(sorted(parsed, key=lambda r: _PRECEDENCE[r.outcome]))
        self._by_id = {r.rule_id: r for r in self.rules}
        #: who decides the requests each approval_required rule opens (rule id -> route)
        self.routes: dict[str, Route] = parse_routes(text, self._by_id,
                                                     Outcome.APPROVAL_REQUIRED)
        self._plan = _plan(model_text)
        # The rows casbin would hold for this policy (add_named_policies), in decision order.
        self._rows = tuple((r.rule_id, r.action, r.resource, r.condition, r.outcome.value)
                           for r in self.rules)
        #: what holding it costs, estimated in bytes (an upper bound of what tracemalloc
        #: measures for rules not shared with other policies): the engine's caches are bounded
        #: by it as well as by their number of entries
        self.weight = 1024 + 2 * len(text) + 1024 * len(self.rules)

    @property
    def casbin_rows(self) -> list[list[str]]:
        """The policy rows as casbin's ``add_named_policies("p", ...)`` takes them."""
        return [list(row) for row in self._rows]

    def evaluate(self, ctx: ActionContext) -> tuple[Outcome, Rule | None]:
        """The outcome for ``ctx`` and the rule that decided it (``None``: default deny)."""
        row = self._plan.first_match(self._rows, ctx.action, ctx.resource,
                                     _Request(ctx, self._by_id))
        if row is None:
            return Outcome.DENY, None
        rule = self._by_id[row[0]]
        return rule.outcome, rule


def compile_policy(text: str, model_text: str | None = None) -> CompiledPolicy:
    """Validate and compile policy text; raise :class:`PolicyInvalidError` naming the line."""
    return CompiledPolicy(text, model_text if model_text is not None else bundled_model())


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one action: the outcome, the rule that decided it and why."""

    outcome: Outcome
    rule_id: str
    explanation: str
    decision_id: str
    policy_version: int
    policy_sha256: str


#: What each of the engine's two caches may hold, in estimated bytes (``CompiledPolicy.weight``).
#: 16384 tenants with distinct ten-rule policies take about 70 MiB; the bound stops a few
#: tenants with maximal policies (or an admin validating many distinct ones) from growing a
#: worker without limit.  The newest entry is always kept.
DEFAULT_CACHE_BYTES = 256 * 2**20


class _Lru:
    """An LRU of compiled policies bounded in entries and in the estimated bytes of the
    distinct policies it holds (many tenants on one policy text share one compiled policy,
    counted once).  Not locked: the engine holds its lock around every call."""

    def __init__(self, entries: int, max_bytes: int) -> None:
        self._items: OrderedDict[str, tuple[int, CompiledPolicy]] = OrderedDict()
        self._holders: dict[int, int] = {}  # id of a held compiled policy -> entries holding it
        self._entries = entries
        self._max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> tuple[int, CompiledPolicy] | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def _hold(self, policy: CompiledPolicy) -> None:
        count = self._holders.get(id(policy), 0)
        if count == 0:
            self.bytes += policy.weight
        self._holders[id(policy)] = count + 1

    def _release(self, policy: CompiledPolicy) -> None:
        count = self._holders.pop(id(policy))
        if count == 1:
            self.bytes -= policy.weight
        else:
            self._holders[id(policy)] = count - 1

    def put(self, key: str, value: tuple[int, CompiledPolicy]) -> None:
        self._hold(value[1])  # before releasing the old one: they may be the same policy
        old = self._items.pop(key, None)
        if old is not None:
            self._release(old[1])
        self._items[key] = value
        while len(self._items) > 1 and (len(self._items) > self._entries
                                        or self.bytes > self._max_bytes):
            _, dropped = self._items.popitem(last=False)
            self._release(dropped[1])


class PolicyEngine:
    """Decides actions against per-tenant compiled policies held in bounded LRU caches.

    ``decide`` is told the tenant's current policy version (the caller reads it from the
    database on every decision, which is how a change reaches every worker process) and a
    loader for the text, called only when the cached version differs.
    """

    def __init__(self, *, model_text: str | None = None, cache_size: int = 16384,
                 max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self._model_text = model_text if model_text is not None else bundled_model()
        _plan(self._model_text)  # a model the engine cannot decide with is refused here
        self._cache_size = cache_size
        #: tenant id -> (policy version, compiled policy)
        self._tenants = _Lru(cache_size, max_bytes)
        #: sha256 of a policy text -> (0, compiled policy)
        self._compiled = _Lru(cache_size, max_bytes)
        self._lock = threading.Lock()

    def compile(self, text: str) -> CompiledPolicy:
        """Compile ``text``, reusing an identical policy compiled before."""
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        with self._lock:
            hit = self._compiled.get(digest)
            if hit is not None:
                return hit[1]
        compiled = CompiledPolicy(text, self._model_text)
        with self._lock:
            self._compiled.put(digest, (0, compiled))
        return compiled

    def policy_for(self, tenant_id: str, version: int, load_text: Callable[[], str]
                   ) -> CompiledPolicy:
        """The tenant's compiled policy at ``version``, compiling it on a miss."""
        with self._lock:
            hit = self._tenants.get(tenant_id)
            if hit is not None and hit[0] == version:
                return hit[1]
        compiled = self.compile(load_text())
        with self._lock:
            self._tenants.put(tenant_id, (version, compiled))
        return compiled

    def decide(
        self,
        ctx: ActionContext,
        *,
        version: int,
        load_text: Callable[[], str],
        decision_id: str | None = None,
    ) -> Decision:
        """Decide ``ctx`` under the tenant's policy at ``version``."""
        policy = self.policy_for(ctx.tenant_id, version, load_text)
        outcome, rule = policy.evaluate(ctx)
        if rule is None:
            rule_id = DEFAULT_RULE_ID
            explanation = f"no rule allows {ctx.action} on {ctx.resource}: denied by default"
        else:
            rule_id, explanation = rule.rule_id, rule.explain()
        return Decision(
            outcome=outcome,
            rule_id=rule_id,
            explanation=explanation,
            decision_id=decision_id or f"dec_{secrets.token_hex(16)}",
            policy_version=version,
            policy_sha256=policy.sha256,
        )

