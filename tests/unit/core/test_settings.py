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


@pytest.mark.parametrize(("given", "resolved", "conninfo"), [
    ("postgresql://u:pw@10.0.0.1:5432,10.0.0.2:5433/db?target_session_attrs=read-write",
     "postgresql+psycopg://u:pw@/db?host=10.0.0.1:5432&host=10.0.0.2:5433"
     "&target_session_attrs=read-write",
     {"host": "10.0.0.1,10.0.0.2", "port": "5432,5433", "dbname": "db", "user": "u",
      "password": "pw", "target_session_attrs": "read-write"}),
    ("postgres://u@a,b/db", "postgresql+psycopg://u@/db?host=a&host=b",
     {"host": "a,b", "port": ",", "dbname": "db", "user": "u"}),  # libpq: default ports
    ("postgresql://u@db:5432/x", "postgresql+psycopg://u@db:5432/x",
     {"host": "db", "port": "5432", "dbname": "x", "user": "u"}),
])
def test_multi_host_urls_keep_every_host(given: str, resolved: str,
                                         conninfo: dict[str, str]) -> None:
    """libpq's failover form (several host:port, target_session_attrs) is what operators copy
    from PostgreSQL's documentation: the engine and the LISTEN connection both get every host."""
    from psycopg.conninfo import conninfo_to_dict

    from sandboxsec.storage.db import Database

    url = Settings(database_url=given).resolved_database_url()
    assert url == resolved
    db = Database(url)
    try:
        assert conninfo_to_dict(db.conninfo()) == conninfo
    finally:
        db.dispose()
