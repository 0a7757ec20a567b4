"""Canonical JSON of action params, their ``params_hash`` and the short code a person compares.

The canonical form is RFC 8785 (JSON Canonicalization Scheme) restricted to values that have
exactly one spelling, so anyone can recompute ``params_hash`` with a stock JCS library:

* objects: member names sorted by their UTF-16 code units, no duplicates, no whitespace;
* strings: UTF-8, escaping only ``"``, ``\\`` and control characters below U+0020
  (``\\b \\f \\n \\r \\t`` short forms, otherwise ``\\u00xx`` in lowercase hex); lone
  surrogates are refused;
* numbers: integers in the IEEE 754 safe range (|n| <= 2^53 - 1) only.  Floats are refused:
  amounts travel as decimal strings (``"125.50"``) so no binary rounding can change them;
* ``true``, ``false``, ``null``, arrays as usual.

``params_hash`` is the lowercase hex SHA-256 of those bytes.  ``short_code`` is the first 40
bits of that hash in RFC 4648 base32, shown as ``XXXX-XXXX`` on the agent's and the approver's
screens so a person can check they are looking at the same request.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sandboxsec.policy.errors import (
    AmountInvalidError,
    ParamsNotCanonicalError,
    ParamsTooLargeError,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_PARAMS_BYTES",
    "MAX_SAFE_INTEGER",
    "canonical_json",
    "params_hash",
    "parse_amount",
    "short_code",
]

MAX_SAFE_INTEGER = 2**53 - 1
#: Nesting limit of params (objects and arrays).
MAX_DEPTH = 16
#: Size limit of the canonical params; an approver must be able to read all of it.
MAX_PARAMS_BYTES = 16 * 1024

_SHORT_ESCAPES = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')
# At most 18 integer digits and 18 fraction digits: enough for any currency, small enough
# that Decimal comparison never needs more precision than its default context.
_AMOUNT = re.compile(r"(0|[1-9][0-9]{0,17})(\.[0-9]{1,18})?")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _escape(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch == '"':
        return '\\"'
    if ch == "\\":
        return "\\\\"
    return _SHORT_ESCAPES.get(ch, f"\\u{ord(ch):04x}")


def _string(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ParamsNotCanonicalError("strings must be valid Unicode (no lone surrogates)") from exc
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


def _utf16_key(name: str) -> bytes:
    return name.encode("utf-16-be", "surrogatepass")


def _emit(value: Any, depth: int, out: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise ParamsTooLargeError(f"params nest deeper than {MAX_DEPTH} levels")
    # bool before int: in Python a bool is an int.
    if value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise ParamsNotCanonicalError("integers must be within +-(2^53 - 1)")
        out.append(str(value))
    elif isinstance(value, float):
        raise ParamsNotCanonicalError(
            "floating-point numbers are refused: send amounts as decimal strings like \"12.50\""
        )
    elif isinstance(value, str):
        out.append(_string(value))
    elif isinstance(value, Mapping):
        names = list(value.keys())
        if not all(isinstance(k, str) for k in names):
            raise ParamsNotCanonicalError("object member names must be strings")
        out.append("{")
        for i, name in enumerate(sorted(names, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_string(name))
            out.append(":")
            _emit(value[name], depth + 1, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, depth + 1, out)
        out.append("]")
    else:
        raise ParamsNotCanonicalError(f"values of type {type(value).__name__} are not JSON")


def canonical_json(value: Any, *, max_bytes: int = MAX_PARAMS_BYTES) -> bytes:
    """The canonical UTF-8 bytes of ``value`` (see the module docstring for the exact form).

    Raises :class:`ParamsNotCanonicalError` for values with no single spelling and
    :class:`ParamsTooLargeError` past ``max_bytes`` or :data:`MAX_DEPTH`.
    """
    out: list[str] = []
    _emit(value, 0, out)
    data = "".join(out).encode("utf-8")
    if len(data) > max_bytes:
        raise ParamsTooLargeError(f"canonical params are {len(data)} bytes, limit {max_bytes}")
    return data


def params_hash(params: Mapping[str, Any], *, max_bytes: int = MAX_PARAMS_BYTES) -> str:
    """Lowercase hex SHA-256 of the canonical JSON of ``params`` (a JSON object)."""
    if not isinstance(params, Mapping):
        raise ParamsNotCanonicalError("params must be a JSON object")
    return hashlib.sha256(canonical_json(params, max_bytes=max_bytes)).hexdigest()


def short_code(hash_hex: str) -> str:
    """``XXXX-XXXX``: the first 40 bits of a params_hash in base32, for people to compare."""
    if not _HEX64.fullmatch(hash_hex):
        raise ParamsNotCanonicalError("params_hash must be 64 lowercase hex characters")
    code = base64.b32encode(bytes.fromhex(hash_hex)[:5]).decode("ascii")
    return f"{code[:4]}-{code[4:]}"


def parse_amount(value: Any) -> Decimal:
    """Parse an amount: a decimal string, no sign, no exponent, no spaces, e.g. ``"125.50"``.

    Integers are accepted too (whole units).  Anything else raises :class:`AmountInvalidError`.
    """
    if isinstance(value, bool):
        raise AmountInvalidError("amount must be a decimal string such as \"125.50\"")
    if isinstance(value, int):
        if value < 0 or value > MAX_SAFE_INTEGER:
            raise AmountInvalidError("amount must be a non-negative safe integer")
        return Decimal(value)
    if not isinstance(value, str) or not _AMOUNT.fullmatch(value):
        raise AmountInvalidError("amount must be a decimal string such as \"125.50\"")
    return Decimal(value)
