"""Strict decoders: one spelling per value, ASCII digits only, no lone surrogates."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxsec.encoding import (
    ascii_int,
    b64decode_strict,
    b64url_decode_strict,
    b64url_encode,
    hex_decode_strict,
    json_lone_surrogate,
)

_STD = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_URL = _STD[:62] + "-_"


@given(st.binary(max_size=64))
def test_round_trip_and_every_other_spelling_is_refused(data: bytes) -> None:
    text = base64.b64encode(data).decode()
    assert b64decode_strict(text) == data
    url = b64url_encode(data)
    assert b64url_decode_strict(url) == data
    # Setting an unused bit of the last character keeps the bytes base64 decodes to.
    body = text.rstrip("=")
    if len(body) % 4:
        odd = body[:-1] + _STD[_STD.index(body[-1]) | 1] + text[len(body):]
        assert base64.b64decode(odd) == data
        with pytest.raises(ValueError):
            b64decode_strict(odd)
        odd_url = url[:-1] + _URL[_URL.index(url[-1]) | 1]
        with pytest.raises(ValueError):
            b64url_decode_strict(odd_url)
    for bad in (text + "=", " " + text, text.replace("=", ""), text + "\n"):
        if bad != text:  # an extra or missing "=", a space, a newline
            with pytest.raises(ValueError):
                b64decode_strict(bad)
    for bad in (url + "=", url + "*", url + "+"):
        with pytest.raises(ValueError):
            b64url_decode_strict(bad)


def _b64url_by_reencoding(text: str) -> bytes | None:
    # The definition: decodes, and re-encodes to itself.
    if len(text) % 4 == 1:
        return None
    try:
        out = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None
    return out if base64.urlsafe_b64encode(out).rstrip(b"=").decode() == text else None


@given(st.text(alphabet=_URL + "=+/ .", max_size=14))
def test_b64url_strict_is_exactly_the_text_that_re_encodes_to_itself(text: str) -> None:
    expected = _b64url_by_reencoding(text) if set(text) <= set(_URL) else None
    if expected is None:
        with pytest.raises(ValueError):
            b64url_decode_strict(text)
    else:
        assert b64url_decode_strict(text) == expected


@pytest.mark.parametrize("text", ["\u00b2", "\u2460", "\u0661", "\uff11", "1_0", " 1", "+1",
                                  "01", "", "1e3", "0x1"])
def test_ascii_int_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        ascii_int(text)


def test_ascii_int_accepts_and_bounds() -> None:
    assert ascii_int("0") == 0 and ascii_int("23", maximum=23) == 23
    with pytest.raises(ValueError):
        ascii_int("24", maximum=23)


def test_hex() -> None:
    assert hex_decode_strict("00ff") == b"\x00\xff"
    for bad in ("0", "00 ff", "\uff10\uff10", "zz"):
        with pytest.raises(ValueError):
            hex_decode_strict(bad)
    with pytest.raises(ValueError):
        hex_decode_strict("FF", lowercase=True)


@pytest.mark.parametrize(("body", "lone"), [
    (b'{"a":"\\ud800"}', True), (b'{"a":"\\udc00"}', True), (b'{"a":"\\ud800x"}', True),
    (b'{"a":"\\ud800\\n\\udc00"}', True), (b'{"a":"\xed\xa0\x80"}', True),
    (b'{"a":"\\ud83d\\ude00"}', False), (b'{"a":"\\\\ud800"}', False), (b'{"a":"\\u00e9"}', False),
])
def test_json_lone_surrogate(body: bytes, lone: bool) -> None:
    assert json_lone_surrogate(body) is lone
