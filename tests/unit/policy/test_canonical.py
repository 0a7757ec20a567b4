"""Canonical JSON, params_hash and short codes: one spelling per value, floats refused."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxsec.policy.canonical import (
    MAX_SAFE_INTEGER,
    canonical_json,
    params_hash,
    parse_amount,
    short_code,
)
from sandboxsec.policy.errors import (
    AmountInvalidError,
    ParamsNotCanonicalError,
    ParamsTooLargeError,
)

json_values = st.recursive(
    st.none() | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"),
                              max_size=8), children, max_size=4),
    max_leaves=20,
)


def test_known_vector() -> None:
    # Sorted keys, no whitespace, UTF-8 text, escapes only where JSON requires.
    params = {"payee": "Müller & Söhne", "amount": "125.50", "currency": "EUR", "n": 3,
              "note": "line1\nline2\t\"q\"\x01"}
    expected = ('{"amount":"125.50","currency":"EUR","n":3,'
                '"note":"line1\\nline2\\t\\"q\\"\\u0001","payee":"Müller & Söhne"}')
    assert canonical_json(params) == expected.encode("utf-8")
    assert params_hash(params) == hashlib.sha256(expected.encode("utf-8")).hexdigest()


def test_keys_sort_by_utf16_code_units() -> None:
    # U+1F600 (surrogates D83D..) sorts before U+FF61 in UTF-16, after it in code points.
    value = {"\uff61": 1, "\U0001f600": 2}
    assert canonical_json(value) == '{"\U0001f600":2,"\uff61":1}'.encode()


@given(json_values)
def test_roundtrip_and_order_independence(value: Any) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded
    if isinstance(value, dict):
        reordered = dict(reversed(list(value.items())))
        assert canonical_json(reordered) == encoded


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_refused(value: float) -> None:
    with pytest.raises(ParamsNotCanonicalError):
        canonical_json({"amount": value})


@pytest.mark.parametrize("value", [
    {"n": MAX_SAFE_INTEGER + 1}, {1: "x"}, {"s": "\ud800"}, {"x": {1, 2}}, {"b": b"raw"},
])
def test_values_without_one_spelling_refused(value: Any) -> None:
    with pytest.raises(ParamsNotCanonicalError):
        canonical_json(value)


def test_params_must_be_an_object() -> None:
    with pytest.raises(ParamsNotCanonicalError):
        params_hash(["not", "an", "object"])  # type: ignore[arg-type]


def test_size_and_depth_limits() -> None:
    with pytest.raises(ParamsTooLargeError):
        canonical_json({"x": "a" * 20_000})
    deep: Any = "leaf"
    for _ in range(40):
        deep = {"d": deep}
    with pytest.raises(ParamsTooLargeError):
        canonical_json(deep)


def test_short_code_is_stable_and_readable() -> None:
    h = params_hash({"amount": "1.00"})
    code = short_code(h)
    assert code == short_code(h)
    assert len(code) == 9 and code[4] == "-"
    assert code != short_code(params_hash({"amount": "1.01"}))
    with pytest.raises(ParamsNotCanonicalError):
        short_code("XYZ")


@pytest.mark.parametrize("raw,expected", [
    ("0", Decimal(0)), ("125.50", Decimal("125.50")), ("10000", Decimal(10000)), (7, Decimal(7)),
])
def test_amounts(raw: Any, expected: Decimal) -> None:
    assert parse_amount(raw) == expected


@pytest.mark.parametrize("raw", [
    "-1", "+1", "1e3", " 1", "1.", ".5", "01", "1,000", "NaN", "Infinity", 1.5, True, None, -3,
])
def test_bad_amounts_refused(raw: Any) -> None:
    with pytest.raises(AmountInvalidError):
        parse_amount(raw)
