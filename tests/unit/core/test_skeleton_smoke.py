from __future__ import annotations

from sandboxsec.storage.db import Database


def test_database_migrates_both_backends(database: Database) -> None:
    assert database.ping()
