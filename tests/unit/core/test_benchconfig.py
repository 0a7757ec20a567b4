"""Benches say which configuration they measure (tests/support/benchconfig.py)."""

from __future__ import annotations

import gc
from pathlib import Path

from sandboxsec.settings import Settings
from tests.support.benchconfig import describe


def test_shipped_defaults_are_called_so(tmp_path: Path) -> None:
    line = describe(Settings(home=tmp_path, database_url=None), database="SQLite")
    assert line == "configuration: shipped defaults; no gc.freeze; SQLite"


def test_every_changed_setting_and_a_frozen_heap_are_named(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, policy_cache_size=20_000, require_session_key=False)
    gc.freeze()
    try:
        line = describe(settings)
    finally:
        gc.unfreeze()
    assert "shipped defaults except policy_cache_size=20000, require_session_key=False" in line
    assert "gc.freeze on" in line
