"""Text a person reads before deciding: refuse characters that make it show something else.

Pure.  Bidi controls (U+202E RIGHT-TO-LEFT OVERRIDE and friends, the "Trojan Source" trick,
CVE-2021-42574), zero-width and other invisible characters, line separators other than ``\\n``
and look-alike spaces let a value be *displayed* as other text than the bytes a grant binds:
``"acme\\u202egmbh"`` renders reversed, ``"acme\\u200bgmbh"`` looks like ``"acmegmbh"``.

:func:`first_unsafe` finds the first such character; callers refuse the value and name the
code point (never the value itself).  :func:`visible` renders a string with every unsafe
character written out as ``<U+202E>``, for places that show stored text (a value stored before
these checks existed must still not mislead).
"""

from __future__ import annotations

import unicodedata

__all__ = ["first_unsafe", "is_unsafe", "visible"]

#: Unicode general categories never shown as themselves: controls, format characters (bidi
#: controls, zero-width joiners and spaces, tags, the BOM), surrogates, private use,
#: unassigned, and the line and paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

#: Letters and marks that render as nothing (or as blank) although their category is
#: printable: Hangul fillers, the braille blank, the combining grapheme joiner, Khmer
#: inherent vowels, Mongolian free variation selectors and the variation selectors.
_INVISIBLE = frozenset((
    0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180F, 0x2800, 0x3164,
    0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0),
))


def is_unsafe(ch: str, *, allow_newlines: bool = False) -> bool:
    """True when ``ch`` (one character) does not display as itself.

    Every space other than U+0020 counts (a no-break space looks like a space but is another
    value).  ``allow_newlines`` lets ``\\n`` and ``\\t`` through, for free text such as a
    message body, shown with its line breaks.
    """
    if ch == " ":
        return False
    if allow_newlines and ch in "\n\t":
        return False
    cp = ord(ch)
    if cp in _INVISIBLE:
        return True
    category = unicodedata.category(ch)
    return category in _UNSAFE_CATEGORIES or category == "Zs"


def first_unsafe(text: str, *, allow_newlines: bool = False) -> str | None:
    """``U+XXXX`` of the first unsafe character of ``text``, or ``None`` when all are safe."""
    # Fast path: printable ASCII is always safe.
    if text.isascii() and text.isprintable():
        return None
    for ch in text:
        if is_unsafe(ch, allow_newlines=allow_newlines):
            return f"U+{ord(ch):04X}"
    return None


def visible(text: str, *, allow_newlines: bool = False) -> str:
    """``text`` with every unsafe character replaced by ``<U+XXXX>``."""
    if first_unsafe(text, allow_newlines=allow_newlines) is None:
        return text
    return "".join(f"<U+{ord(ch):04X}>" if is_unsafe(ch, allow_newlines=allow_newlines)
                   else ch for ch in text)
