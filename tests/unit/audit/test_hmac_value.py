"""Stored MACs of sensitive values: the per-key template gives the one-shot HMAC, per key."""

from __future__ import annotations

import hmac
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.entry import canonical_json, hmac_value

_VALUES = st.one_of(
    st.text(), st.integers(), st.booleans(), st.none(), st.lists(st.integers(), max_size=4),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=80), min_size=1, max_size=4, unique=True),
       _VALUES)
def test_hmac_value_is_the_one_shot_hmac_under_each_key(keys: list[bytes], value: object) -> None:
    data = value.encode() if isinstance(value, str) else canonical_json(value).encode()
    for key in keys + keys[::-1]:  # every key again, after the others were used
        expected = "hmac-sha256:" + hmac.digest(key, data, "sha256").hex()
        assert hmac_value(key, value) == expected


def test_the_same_value_under_two_keys_differs() -> None:
    assert hmac_value(b"a" * 32, "iban") != hmac_value(b"b" * 32, "iban")
    assert json.loads(canonical_json(1.5)) == 1.5
