"""The one canonical target of an action, and the canonical spelling of domains and ids.

Pure.  Rules match on the ``resource`` string (``payee:acme-gmbh``, ``domain:bank.example``)
and on attributes derived from it and from the params.  If the engine matched on what the
agent wrote, a deny rule on ``domain:evil.example`` would miss ``domain:EVIL.example.``, and a
deny rule on ``payee:evil`` would miss a payment whose resource says ``app:x`` while
``params.payee`` is ``evil``.  So, before any rule is looked at, :func:`resolve_target`:

1. reads the targets the agent named: the resource's kind (``app``, ``domain``, ``payee``;
   the kind itself is case-folded) and the params of those names;
2. puts each in canonical form (:func:`canonical_domain`, :func:`canonical_id`);
3. requires them to name ONE target: one value (else ``action_invalid``) of one kind (else
   ``action_target_conflict``);
   an action with a declared target kind (a payment's payee, a login's domain) takes that
   kind only;
4. returns the canonical resource ``<kind>:<value>`` the engine matches on, whatever the
   agent put in ``resource``.

Canonical forms:

* a domain: IDNA 2008 with the UTS #46 mapping (full-width letters and dots, case), then the
  ASCII form (A-labels, ``xn--``), lower case, no trailing dot.  Whitespace, ``%`` (percent-
  encoding), an invalid name, and a label that mixes scripts (``p\u0430ypal`` with a Cyrillic
  ``\u0430``) are refused.  Two spellings of one DNS name get one canonical form.
* a payee or app id: opaque, so it is never rewritten into another id; it must already be in
  canonical form (NFKC, lower case, no whitespace, no ``%``, one script), else refused naming
  the canonical spelling.  Rewriting ``ACME`` to ``acme`` could allow another account than
  the one a rule names; refusing it leaves no doubt.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import idna

from sandboxsec.display import first_unsafe
from sandboxsec.policy.errors import (
    ActionInvalidError,
    ActionTargetConflictError,
    ActionTargetInvalidError,
    ParamsTextUnsafeError,
)

__all__ = [
    "ACTION_TARGETS",
    "MAX_RESOURCE",
    "TARGET_KINDS",
    "Target",
    "canonical_domain",
    "canonical_id",
    "canonical_value",
    "check_params_text",
    "resolve_target",
    "split_resource",
]

#: Resource kinds whose value rules and attributes read.
TARGET_KINDS = ("app", "domain", "payee")
#: Actions whose target is always of one kind.
ACTION_TARGETS: Mapping[str, str] = {"payment": "payee", "login": "domain"}
MAX_RESOURCE = 512
_MAX_ID = 256
_KIND = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


@dataclass(frozen=True, slots=True)
class Target:
    """What an action acts on: the canonical resource and the canonical target attributes."""

    resource: str
    kind: str | None
    value: str | None

    def attribute(self, kind: str) -> str | None:
        """The canonical value of ``kind`` when that is this target's kind."""
        return self.value if self.kind == kind else None


_CJK = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "IDEOGRAPHIC")


def _mixes_scripts(text: str) -> bool:
    """True when the letters of ``text`` come from more than one script.

    Digits, marks and punctuation belong to no script.  Han, kana, Hangul and Bopomofo count
    as one script, and each may go with Latin (the "highly restrictive" profile of UTS #39,
    as browsers apply it to domain names).
    """
    scripts = set()
    for ch in text:
        if unicodedata.category(ch).startswith("L"):
            name = unicodedata.name(ch, "UNKNOWN")
            scripts.add("CJK" if name.startswith(_CJK) else name.split(" ", 1)[0])
    return len(scripts) > 1 and scripts != {"LATIN", "CJK"}


def _refuse_common(what: str, raw: str, *, opaque: bool = False) -> None:
    if not raw:
        raise ActionTargetInvalidError(f"{what} is empty")
    if len(raw) > MAX_RESOURCE:
        raise ActionTargetInvalidError(f"{what} is longer than {MAX_RESOURCE} characters")
    bad = first_unsafe(raw)
    if bad is not None:
        raise ActionTargetInvalidError(f"{what} contains {bad}, which does not display as itself")
    if opaque:
        return  # a resource of another kind keeps its spaces and its percent signs
    if any(ch.isspace() for ch in raw):
        raise ActionTargetInvalidError(f"{what} must not contain whitespace")
    if "%" in raw:
        raise ActionTargetInvalidError(f"{what} must not be percent-encoded")


def canonical_domain(raw: str, *, what: str = "domain") -> str:
    """The canonical (A-label, lower-case, no trailing dot) form of a DNS name, or refused."""
    _refuse_common(what, raw)
    try:
        # UTS #46 maps full-width forms, upper case and the ideographic full stops; then one
        # trailing dot (the root) names the same domain.  Empty labels are refused below.
        mapped = idna.uts46_remap(unicodedata.normalize("NFKC", raw), std3_rules=True,
                                  transitional=False)
        if mapped.endswith("."):
            mapped = mapped[:-1]
        ascii_name = idna.encode(mapped).decode("ascii")
        if not ascii_name or ascii_name.endswith("."):
            raise ValueError("empty label")
        unicode_name = idna.decode(ascii_name)
    except (idna.IDNAError, UnicodeError, ValueError):
        raise ActionTargetInvalidError(f"{what} is not a valid domain name") from None
    for label in unicode_name.split("."):
        if _mixes_scripts(label):
            raise ActionTargetInvalidError(
                f"{what} has a label that mixes scripts (a look-alike of another name)"
            )
    return ascii_name.lower()


def canonical_id(raw: str, *, what: str = "id") -> str:
    """``raw`` when it is a canonical payee or app id; refused (naming the canonical form)."""
    _refuse_common(what, raw)
    if len(raw) > _MAX_ID:
        raise ActionTargetInvalidError(f"{what} is longer than {_MAX_ID} characters")
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", raw).casefold())
    if _mixes_scripts(folded):
        raise ActionTargetInvalidError(f"{what} mixes scripts (a look-alike of another id)")
    if folded != raw:
        # Never echo the value: name the rule it breaks.
        raise ActionTargetInvalidError(f"{what} is not in canonical form (NFKC, lower case)")
    return raw


def canonical_value(kind: str, raw: str, *, what: str | None = None) -> str:
    """The canonical form of a value of target ``kind``."""
    label = what or kind
    if kind == "domain":
        return canonical_domain(raw, what=label)
    return canonical_id(raw, what=label)


def split_resource(resource: str) -> tuple[str | None, str]:
    """``(kind, value)`` of a resource; the kind is NFKC case-folded (``None``: no kind)."""
    kind, sep, value = resource.partition(":")
    if not sep:
        return None, resource
    folded = unicodedata.normalize("NFKC", kind).casefold()
    return (folded, value) if _KIND.fullmatch(folded) else (None, resource)


def _named_in_params(params: Mapping[str, Any]) -> dict[str, str]:
    named: dict[str, str] = {}
    for kind in TARGET_KINDS:
        if kind not in params:
            continue
        value = params[kind]
        if not isinstance(value, str):
            raise ActionTargetInvalidError(f"params.{kind} must be a string")
        named[kind] = canonical_value(kind, value, what=f"params.{kind}")
    return named


def resolve_target(action: str, resource: Any, params: Mapping[str, Any]) -> Target:
    """The one canonical target of ``action`` (see the module docstring for the steps)."""
    if not isinstance(resource, str) or not resource:
        raise ActionInvalidError(f"resource must be a non-empty string of at most "
                                 f"{MAX_RESOURCE} characters")
    _refuse_common("resource", resource, opaque=True)
    # 1.-2. every target named, in canonical form
    kind, value = split_resource(resource)
    named = _named_in_params(params)
    if kind in TARGET_KINDS:
        canonical = canonical_value(kind, value, what=f"resource {kind}")
        other = named.get(kind)
        if other is not None and other != canonical:
            # action_invalid, as this refusal always was (codes are never renamed)
            raise ActionInvalidError(f"resource and params.{kind} name different {kind}s")
        named[kind] = canonical
    # 3. one target
    declared = ACTION_TARGETS.get(action)
    if declared is not None and any(k != declared for k in named):
        raise ActionTargetConflictError(
            f"the target of a {action} is its {declared}; it names "
            f"{', '.join(sorted(k for k in named if k != declared))} instead or as well")
    if len(named) > 1:
        raise ActionTargetConflictError(
            f"an action has one target; this one names {', '.join(sorted(named))}")
    if declared is not None and declared not in named:
        raise ActionInvalidError(f"a {action} names its {declared} "
                                 f"(resource {declared}:<{declared}> or params.{declared})")
    # 4. the canonical resource
    if named:
        (target_kind, target_value), = named.items()
        return Target(f"{target_kind}:{target_value}", target_kind, target_value)
    if kind is not None:
        return Target(f"{kind}:{value}", None, None)
    return Target(resource, None, None)


def check_params_text(value: Any, path: str = "params") -> None:
    """Refuse any param name or string value holding a character that does not display as
    itself (:mod:`sandboxsec.display`); string values may hold line breaks and tabs."""
    if isinstance(value, str):
        bad = first_unsafe(value, allow_newlines=True)
        if bad is not None:
            raise ParamsTextUnsafeError(f"{path} contains {bad}, which does not display as "
                                        "itself")
    elif isinstance(value, Mapping):
        for name, item in value.items():
            if isinstance(name, str):
                bad = first_unsafe(name)
                if bad is not None:
                    raise ParamsTextUnsafeError(f"a member name in {path} contains {bad}")
                check_params_text(item, f"{path}.{name}" if name.isidentifier() else path)
            else:
                check_params_text(item, path)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_params_text(item, f"{path}[{i}]")
