from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from sandboxsec.settings import Settings

DOCS = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_every_setting_is_documented() -> None:
    text = DOCS.read_text()
    missing = [f"SANDBOXSEC_{n.upper()}" for n in Settings.model_fields
               if f"`SANDBOXSEC_{n.upper()}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_environment_overrides_and_postgres_url(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("SANDBOXSEC_HOME", str(tmp_path))
    monkeypatch.setenv("SANDBOXSEC_DATABASE_URL", "postgresql://u@db/x")
    s = Settings()
    assert s.home == tmp_path
    assert s.resolved_database_url() == "postgresql+psycopg://u@db/x"
    monkeypatch.delenv("SANDBOXSEC_DATABASE_URL")
    assert Settings().resolved_database_url() == f"sqlite:///{tmp_path / 'sandboxsec.db'}"


def test_out_of_range_settings_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBOXSEC_MAX_BODY_BYTES", "10")
    with pytest.raises(ValidationError):
        Settings()
