"""alembic environment: the engine comes from the caller, the metadata from the registry."""

from __future__ import annotations

from alembic import context

from sandboxsec.schema import metadata

config = context.config
engine = config.attributes["engine"]

with engine.begin() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata(),
        render_as_batch=engine.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
