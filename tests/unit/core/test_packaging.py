"""Packaged copies of the human-edited files must equal their top-level twins."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PKG = ROOT / "sandboxsec"


def _pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for src in sorted((ROOT / "policies").glob("*")):
        if src.is_file():
            pairs.append((src, PKG / "policy" / "data" / src.name))
    return pairs


@pytest.mark.parametrize(("top", "packaged"), _pairs(), ids=lambda p: p.name)
def test_packaged_copy_equals_top_level(top: Path, packaged: Path) -> None:
    assert packaged.is_file(), f"{packaged} missing: copy {top} into the package"
    assert packaged.read_bytes() == top.read_bytes(), f"{packaged} differs from {top}"
