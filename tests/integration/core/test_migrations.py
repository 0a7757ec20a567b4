from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sandboxsec.schema import metadata
from sandboxsec.storage.db import Database


def test_migrations_produce_exactly_the_models(database: Database) -> None:
    """After ``alembic upgrade head`` the schema equals the models: no migration is missing."""
    with database.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": False})
        diff = compare_metadata(ctx, metadata())
    assert diff == []


def test_migrate_is_idempotent(database: Database) -> None:
    database.migrate()
    database.migrate()
    assert database.ping()
