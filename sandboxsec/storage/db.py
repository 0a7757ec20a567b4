"""The database adapter: one engine, short transactions, failures mapped to fail-closed errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool
from sqlmodel import Session, create_engine

from sandboxsec.errors import DependencyUnavailableError

__all__ = ["Database", "DatabaseUnavailableError"]


class DatabaseUnavailableError(DependencyUnavailableError):
    """The database could not be reached or did not answer in time; nothing was decided."""

    code = "database_unavailable"


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class Database:
    """An SQLite file (WAL) or a PostgreSQL server behind one SQLAlchemy engine.

    ``session()`` is the only way code touches the database: it commits on success, rolls back
    on any exception, and turns connection-level failures into :class:`DatabaseUnavailableError`
    (HTTP 503) so callers fail closed.
    """

    def __init__(self, url: str, *, pool_size: int = 10, timeout_seconds: float = 5.0) -> None:
        self.url = url
        self.is_postgres = url.startswith("postgresql")
        self.is_sqlite = url.startswith("sqlite")
        self.timeout_seconds = timeout_seconds
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": timeout_seconds}
            kwargs["poolclass"] = NullPool if not path or path == ":memory:" else None
            if kwargs["poolclass"] is None:
                del kwargs["poolclass"]
                kwargs["pool_size"] = pool_size
                kwargs["max_overflow"] = pool_size
                kwargs["pool_timeout"] = timeout_seconds
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            kwargs["pool_timeout"] = timeout_seconds
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {
                "connect_timeout": max(1, int(timeout_seconds)),
                "options": f"-c lock_timeout={int(timeout_seconds * 1000)}"
                f" -c statement_timeout={int(timeout_seconds * 4000)}",
            }
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commit on success, roll back on error, fail closed on outages."""
        try:
            with Session(self.engine, expire_on_commit=False) as s:
                try:
                    yield s
                    s.commit()
                except BaseException:
                    s.rollback()
                    raise
        except (OperationalError, DBAPIError, PoolTimeout) as exc:
            if _is_unavailable(exc):
                raise DatabaseUnavailableError(
                    "the database is unavailable; the request was not carried out"
                ) from exc
            raise

    def migrate(self) -> None:
        """Bring the schema to the newest revision (alembic ``upgrade head``)."""
        from sandboxsec.storage.migrate import upgrade

        try:
            upgrade(self.engine)
        except OperationalError as exc:
            raise DatabaseUnavailableError("the database is unavailable for migration") from exc

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the single writer; synchronous=NORMAL is durable across
    # process crashes in WAL mode (a power loss can lose the last transactions, documented).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
