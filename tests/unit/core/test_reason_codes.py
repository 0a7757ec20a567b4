"""Every reason code a caller can receive is documented under docs/."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import sandboxsec
from sandboxsec.errors import all_reason_codes

DOCS = Path(__file__).resolve().parents[3] / "docs"


def _import_everything() -> None:
    for mod in pkgutil.walk_packages(sandboxsec.__path__, "sandboxsec."):
        if mod.name.endswith((".asgi", ".__main__")) or ".migrations" in mod.name:
            continue
        importlib.import_module(mod.name)


def test_every_reason_code_is_documented() -> None:
    _import_everything()
    text = "\n".join(p.read_text() for p in DOCS.glob("*.md"))
    missing = [code for code in all_reason_codes() if not re.search(rf"`{code}`", text)]
    assert not missing, f"undocumented reason codes (add them, in backticks, to docs/): {missing}"


def test_reason_codes_are_snake_case_and_unique_per_class() -> None:
    _import_everything()
    codes = all_reason_codes()
    for code in codes:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", code), code
