"""Checks that a policy only names values the engine can produce.

Pure.  A rule ``domain == EVIL.example`` can never match: the engine compares canonical
domains (:mod:`sandboxsec.policy.target`), which are lower case.  A rule that cannot match
looks like protection and is none, so the validator refuses it, naming the line.  The same
holds for a lower-case currency, an upper-case payee, a resource pattern ``domain:EVIL.*``,
and for policy text whose lines are separated by anything but ``\\n`` or that holds a
character that does not display as itself (a rule hidden after U+2028 inside a comment looks
like part of the comment in an editor, but is a rule to any parser that splits there).
"""

from __future__ import annotations

import re
import unicodedata

from sandboxsec.display import first_unsafe
from sandboxsec.errors import SandboxSecError
from sandboxsec.policy.errors import PolicyInvalidError
from sandboxsec.policy.target import TARGET_KINDS, canonical_value, split_resource

__all__ = ["check_line", "check_resource_pattern", "check_str_value"]

#: Every line boundary Python's ``str.splitlines`` (and many editors and parsers) knows,
#: except ``\n``: CR, VT, FF, FS, GS, RS, NEL, LINE SEPARATOR, PARAGRAPH SEPARATOR.
_SEPARATORS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_CURRENCY = re.compile(r"[A-Z]{3}")
_ACTION = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_DIGEST = re.compile(r"[a-z0-9]+:[0-9a-f]{32,128}")
_ROLES = frozenset({"admin", "agent", "approver", "auditor"})


def check_line(raw_line: str, line: int) -> None:
    """Refuse a line holding another line separator or a character that hides text."""
    sep = _SEPARATORS.search(raw_line)
    if sep is not None:
        raise PolicyInvalidError(
            f"U+{ord(sep.group(0)):04X} is a line separator: policy lines end with \\n only",
            line=line)
    bad = first_unsafe(raw_line.replace("\t", " "))
    if bad is not None:
        raise PolicyInvalidError(f"control characters are not allowed: {bad} does not "
                                 "display as itself", line=line)


def _canonical_or_refuse(kind: str, value: str, line: int, what: str) -> None:
    try:
        canonical = canonical_value(kind, value)
    except SandboxSecError as exc:
        raise PolicyInvalidError(f"{what} {value!r}: {exc.message}", line=line) from None
    if canonical != value:
        raise PolicyInvalidError(
            f"{what} {value!r} never matches: the engine compares {kind}s as {canonical!r}",
            line=line)


def _check_resource(value: str, line: int, what: str) -> None:
    kind, rest = split_resource(value)
    if kind is not None and not value.startswith(kind + ":"):
        raise PolicyInvalidError(f"{what} {value!r} never matches: resource kinds are "
                                 f"lower case ({kind!r})", line=line)
    if kind in TARGET_KINDS:
        _canonical_or_refuse(kind, rest, line, what)


def check_str_value(attribute: str, value: str, line: int) -> None:
    """Refuse a value of ``attribute`` that the engine never produces."""
    if attribute in ("domain", "payee", "app"):
        _canonical_or_refuse(attribute, value, line, f"{attribute} value")
    elif attribute == "currency" and not _CURRENCY.fullmatch(value):
        raise PolicyInvalidError(f"currency {value!r} never matches: currencies are ISO 4217 "
                                 "codes in upper case, such as EUR", line=line)
    elif attribute == "action" and not _ACTION.fullmatch(value):
        raise PolicyInvalidError(f"action {value!r} never matches: actions are lower case",
                                 line=line)
    elif attribute == "role" and value not in _ROLES:
        raise PolicyInvalidError(f"role {value!r} never matches: roles are "
                                 f"{', '.join(sorted(_ROLES))}", line=line)
    elif attribute == "image_digest" and not _DIGEST.fullmatch(value):
        raise PolicyInvalidError(f"image_digest {value!r} never matches: digests are "
                                 "<algorithm>:<lower-case hex>", line=line)
    elif attribute == "resource":
        _check_resource(value, line, "resource value")


def check_resource_pattern(pattern: str, line: int) -> None:
    """Refuse a resource pattern no canonical resource can match (``*`` is the wildcard)."""
    if pattern == "*":
        return
    kind, rest = split_resource(pattern)
    if kind is None:
        return
    if not pattern.startswith(kind + ":"):
        raise PolicyInvalidError(f"resource pattern {pattern!r} never matches: resource kinds "
                                 f"are lower case ({kind!r})", line=line)
    if kind not in TARGET_KINDS:
        return
    if "*" not in rest:
        _canonical_or_refuse(kind, rest, line, "resource pattern")
        return
    # A wildcard pattern: every literal part must be spelled as canonical values are.
    for part in rest.split("*"):
        folded = unicodedata.normalize("NFKC", part).casefold()
        if part != folded or (kind == "domain" and not part.isascii()):
            raise PolicyInvalidError(
                f"resource pattern {pattern!r} never matches: {kind}s are compared in "
                + ("lower-case ASCII (A-labels)" if kind == "domain" else "lower case"),
                line=line)
    if kind == "domain" and rest.endswith("."):
        raise PolicyInvalidError(f"resource pattern {pattern!r} never matches: domains are "
                                 "compared without a trailing dot", line=line)
