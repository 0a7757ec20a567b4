"""Argument types shared by command modules."""

from __future__ import annotations

import argparse

from sandboxsec.encoding import ascii_int

__all__ = ["decimal"]


def decimal(text: str) -> int:
    """A non-negative integer of ASCII digits (argparse's ``int`` also takes ``"١٢"``)."""
    try:
        return ascii_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r} is not a decimal number") from None
