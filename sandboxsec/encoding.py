"""Strict decoders for text encodings that arrive from outside: base64, base64url, hex, integers.

Every decoder here accepts exactly one spelling of each value and raises :class:`ValueError`
for anything else, so the caller can turn it into its own reason code:

* base64 and base64url: only the alphabet, canonical padding (``=`` for standard base64 when
  ``padded``, none for unpadded base64url), and the unused low bits of the last character
  zero, i.e. the text re-encodes to itself.  ``binascii`` alone accepts ``QR==`` for ``QQ==``
  and (without ``validate``) skips junk characters: one value, many spellings;
* hex: ASCII hex digits only, an even count (``bytes.fromhex`` also takes spaces);
* integers: ASCII digits only, no sign, no ``_``, no leading zero (``int`` also takes
  ``"١٢"``, ``" 12"`` and ``"1_2"``; ``str.isdigit`` is true for ``"²"`` and ``"①"``, which
  ``int`` then refuses);
* text that will be encoded: no lone surrogates (JSON's ``"\\ud800"`` decodes to a ``str``
  that cannot be encoded as UTF-8).

Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

__all__ = [
    "ascii_int",
    "b64decode_strict",
    "b64url_decode_strict",
    "b64url_encode",
    "hex_decode_strict",
    "is_utf8_encodable",
    "json_lone_surrogate",
]

_B64: Final = re.compile(r"[A-Za-z0-9+/]*={0,2}", re.ASCII)
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)
_HEX_ANY: Final = re.compile(r"(?:[0-9a-fA-F]{2})*", re.ASCII)
_HEX_LOWER: Final = re.compile(r"(?:[0-9a-f]{2})*", re.ASCII)
_INT: Final = re.compile(r"0|[1-9][0-9]*", re.ASCII)
_B64URL_VALUE: Final = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_URL_TO_STD: Final = bytes.maketrans(b"-_", b"+/")


def b64decode_strict(text: str | bytes, *, padded: bool = True) -> bytes:
    """Decode standard base64 (RFC 4648 section 4) in its one canonical spelling.

    With ``padded`` (the default) the length must be a multiple of 4 with ``=`` padding;
    without it, no ``=`` may appear.  Raises :class:`ValueError` for anything else.
    """
    raw = text.decode("ascii") if isinstance(text, bytes | bytearray) else text
    if not isinstance(raw, str) or not _B64.fullmatch(raw):
        raise ValueError("not base64")
    if padded:
        if len(raw) % 4:
            raise ValueError("base64 length is not a multiple of 4")
        body = raw
    else:
        if "=" in raw:
            raise ValueError("unpadded base64 has padding")
        body = raw + "=" * (-len(raw) % 4)
    try:
        out = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None
    if base64.b64encode(out).decode("ascii") != body:
        # The last character's unused bits were not zero (or the padding is wrong).
        raise ValueError("not canonical base64")
    return out


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 section 5), as JOSE uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode_strict(text: str) -> bytes:
    """Decode unpadded base64url in its one canonical spelling, or raise :class:`ValueError`."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    rest = len(text) % 4
    if rest == 1:
        raise ValueError("not unpadded base64url")
    # Canonical: the last character's unused low bits (4 of them after 2 characters of a
    # quantum, 2 after 3) are zero, i.e. the text re-encodes to itself.  Checked on the
    # character, on every proof this is read from, instead of by re-encoding.
    if rest and _B64URL_VALUE[text[-1]] & (0x0F if rest == 2 else 0x03):
        raise ValueError("not canonical base64url")
    # The alphabet and the length were checked: this decodes.
    return binascii.a2b_base64(text.encode("ascii").translate(_URL_TO_STD) + b"=" * (-rest % 4))


def hex_decode_strict(text: str, *, lowercase: bool = False) -> bytes:
    """Decode hex of ASCII digits only (lowercase only with ``lowercase``)."""
    pattern = _HEX_LOWER if lowercase else _HEX_ANY
    if not isinstance(text, str) or not pattern.fullmatch(text):
        raise ValueError("not hex")
    return bytes.fromhex(text)


def ascii_int(text: str, *, maximum: int | None = None) -> int:
    """A non-negative decimal integer of ASCII digits without leading zeros.

    Raises :class:`ValueError` for anything else, including values above ``maximum``.
    """
    if not isinstance(text, str) or len(text) > 40 or not _INT.fullmatch(text):
        raise ValueError("not a decimal integer")
    value = int(text)
    if maximum is not None and value > maximum:
        raise ValueError("integer out of range")
    return value


def is_utf8_encodable(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (it cannot be stored or signed as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_JSON_ESCAPE: Final = re.compile(rb"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def json_lone_surrogate(body: bytes) -> bool:
    """True when a JSON text holds a surrogate that is not half of a pair.

    Such a text decodes (``json.loads`` even turns the CESU bytes ``ED A0 80`` into one) to a
    ``str`` that no UTF-8 encoder, database driver or signature accepts.  Raw bytes are
    checked as strict UTF-8 first; then ``\\uXXXX`` escapes are walked in order, so an
    escaped backslash followed by ``ud800`` is not mistaken for an escape.
    """
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return True
    if b"\\u" not in body:
        return False
    pending_high = -1  # end offset of an unpaired high surrogate escape
    for match in _JSON_ESCAPE.finditer(body):
        code = int(match.group(1), 16) if match.group(1) is not None else -1
        if pending_high >= 0:
            if match.start() == pending_high and 0xDC00 <= code <= 0xDFFF:
                pending_high = -1
                continue
            return True
        if 0xD800 <= code <= 0xDBFF:
            pending_high = match.end()
        elif 0xDC00 <= code <= 0xDFFF:
            return True
    return pending_high >= 0
