"""Schema migrations with alembic, run programmatically (no alembic.ini needed).

Only ``sandboxsec migrate`` (and ``serve --migrate``, and ``serve`` on the embedded SQLite
default) change the schema; every other command checks it with :func:`schema_status` and
refuses to run on a database that is missing or not at this version's head.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Engine

__all__ = ["SchemaStatus", "alembic_config", "head_revision", "schema_status", "upgrade"]

_HERE = Path(__file__).parent / "migrations"
#: pg_advisory_lock key of schema migrations: the first 8 bytes of SHA-256("sandboxsec/migrate")
#: as a signed 64-bit integer, so it cannot collide with the application's own locks by chance.
_PG_LOCK_KEY = 0x2F5C_1D3A_6B8E_4C71


def alembic_config(engine: Engine) -> Config:
    """An alembic ``Config`` bound to ``engine`` and the packaged migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest revision of the packaged migrations (this version's schema)."""
    head = ScriptDirectory(str(_HERE)).get_current_head()
    assert head is not None
    return head


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands against this version's migrations."""

    current: str | None
    head: str
    known: bool

    @property
    def up_to_date(self) -> bool:
        """The schema is exactly this version's."""
        return self.current == self.head

    def describe(self) -> str:
        """One sentence for an operator."""
        if self.current is None:
            return "the database has no sandboxsec schema"
        if self.up_to_date:
            return f"the schema is current ({self.head})"
        if not self.known:
            return (f"the schema ({self.current}) is newer than this version of sandboxsec "
                    f"knows ({self.head}): upgrade sandboxsec")
        return f"the schema is at {self.current}, this version needs {self.head}"


def schema_status(engine: Engine) -> SchemaStatus:
    """Read the schema revision (read only: creates nothing)."""
    scripts = ScriptDirectory(str(_HERE))
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    try:
        known = current is None or scripts.get_revision(current) is not None
    except Exception:
        known = False
    head = scripts.get_current_head()
    assert head is not None
    return SchemaStatus(current, head, known)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migrator at a time, across processes and nodes.

    PostgreSQL: a session-level advisory lock on its own connection (every node sees it).
    SQLite: ``flock`` on a file beside the database (one machine by nature).
    """
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    path = engine.url.database
    if not path or path == ":memory:":
        yield
        return
    fd = os.open(f"{path}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the schema of ``engine`` to ``revision``, holding the migration lock.

    Two nodes starting at once both call this: the second waits for the first, then finds
    the schema at head and does nothing.
    """
    with _migration_lock(engine):
        command.upgrade(alembic_config(engine), revision)
