"""The database adapter: one engine, short transactions, failures mapped to fail-closed errors."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import event
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import NullPool
from sqlalchemy.sql import ClauseElement
from sqlmodel import Session, create_engine

from sandboxsec.errors import DependencyUnavailableError

if TYPE_CHECKING:
    from sandboxsec.storage.migrate import SchemaStatus

__all__ = [
    "Database",
    "DatabaseMissingError",
    "DatabaseUnavailableError",
    "DriverForm",
    "DriverStatement",
    "SchemaNotCurrentError",
    "after_commit",
]


class DatabaseUnavailableError(DependencyUnavailableError):
    """The database could not be reached or did not answer in time; nothing was decided."""

    code = "database_unavailable"


class DatabaseMissingError(DependencyUnavailableError):
    """There is no database where the settings point (nothing was created: run migrate)."""

    code = "database_missing"


class SchemaNotCurrentError(DependencyUnavailableError):
    """The database's schema is not this version's (run ``sandboxsec migrate``)."""

    code = "schema_not_current"


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


_AFTER_COMMIT = "sandboxsec.after_commit"


def after_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` once ``session`` (from :meth:`Database.session`) committed and returned its
    connection; never after a rollback.  ``fn`` must not raise."""
    session.info.setdefault(_AFTER_COMMIT, []).append(fn)


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
                _private_sqlite_files(Path(path))
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
        self._writer_lock: _WriterLock | None = None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            path = url.split("sqlite:///", 1)[1] if "sqlite:///" in url else ""
            if path and path != ":memory:":
                self._writer_lock = _WriterLock(Path(path + ".writer-lock"), timeout_seconds)
                self._writer_lock.install(self.engine)

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
            # Committed and the connection is back in the pool (so these may use another).
            for fn in s.info.pop(_AFTER_COMMIT, ()):
                fn()
        except (OperationalError, DBAPIError, PoolTimeout) as exc:
            if _is_unavailable(exc):
                raise DatabaseUnavailableError(
                    "the database is unavailable; the request was not carried out"
                ) from exc
            raise

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core transaction (no ORM session): commit on success, roll back on error, fail
        closed on outages exactly like :meth:`session`.  For hot-path statements built once
        (an ORM session and its unit of work cost more than a primary-key read)."""
        try:
            with self.engine.begin() as conn:
                yield conn
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
        except (OperationalError, DBAPIError) as exc:
            raise DatabaseUnavailableError("the database is unavailable for migration") from exc

    def schema_status(self) -> SchemaStatus:
        """Where the schema stands (read only)."""
        from sandboxsec.storage.migrate import schema_status

        try:
            return schema_status(self.engine)
        except (OperationalError, DBAPIError) as exc:
            raise DatabaseUnavailableError("the database is unavailable") from exc

    def require_current_schema(self) -> None:
        """Raise :class:`SchemaNotCurrentError` unless the schema is this version's."""
        status = self.schema_status()
        if not status.up_to_date:
            raise SchemaNotCurrentError(
                f"{status.describe()}; run `sandboxsec migrate` with the same settings")

    def ping(self) -> bool:
        """True when a trivial query succeeds."""
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def conninfo(self) -> str:
        """The libpq connection string of this engine's URL (PostgreSQL only), for a raw
        connection of our own (LISTEN): every host of a multi-host URL and options such as
        ``target_session_attrs`` are kept, so it follows a failover like the pool does."""
        from psycopg.conninfo import make_conninfo

        _, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        kwargs.pop("context", None)
        return make_conninfo("", **{k: v for k, v in kwargs.items() if isinstance(v, str | int)})

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


_DML = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_HELD = "sandboxsec_writer_lock"


@dataclass(frozen=True, slots=True)
class DriverForm:
    """A Core statement as the database driver takes it: the SQL SQLAlchemy compiles for the
    dialect, the order of its parameters (None for a named paramstyle such as psycopg's,
    which takes a mapping) and the dialect's bind processing of each parameter that has one
    (SQLite's DATETIME writes its fixed text form), as SQLAlchemy's execution applies it."""

    sql: str
    positions: tuple[str, ...] | None
    processors: dict[str, Callable[[Any], Any]]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> DriverForm:
        """Compile ``statement`` for ``dialect``."""
        compiled = statement.compile(dialect=dialect)
        positions = getattr(compiled, "positiontup", None)
        processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in getattr(compiled, "binds", {}).items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        return cls(compiled.string, tuple(positions) if positions else None, processors)


class DriverStatement:
    """A Core statement compiled once for ``db``'s dialect, run on the driver's own cursor in
    a transaction the caller holds (:meth:`first`).

    For a one-row statement on the path of every request (the single-use claim of a session
    proof), where SQLAlchemy's execution machinery (execution context, result wrapping,
    events) costs several times what the database spends on the row.  What that machinery
    would do for this statement still happens: the SQL text is the one SQLAlchemy compiles,
    every value goes through its column type's bind processing, a write takes the SQLite
    writer lock first (as :class:`_WriterLock` does for the engine's statements, released
    when the transaction ends), and a driver error is raised as SQLAlchemy's own error class
    (so :meth:`Database.session` and :meth:`Database.connection` still fail closed).
    """

    __slots__ = ("_dbapi_error", "_lock", "_positions", "_processors", "_sql")

    def __init__(self, db: Database, statement: ClauseElement) -> None:
        dialect = db.engine.dialect
        form = DriverForm.of(statement, dialect)
        self._sql = form.sql
        self._positions = form.positions
        self._processors = form.processors
        is_write = self._sql.lstrip()[:7].upper().startswith(_DML)
        self._lock = db._writer_lock if is_write else None
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error

    def first(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Execute with ``params`` in ``conn``'s transaction; the first row, or None."""
        processors = self._processors
        values = {k: (processors[k](v) if k in processors else v) for k, v in params.items()}
        args: Any = ([values[n] for n in self._positions] if self._positions is not None
                     else values)
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        cursor = None
        try:
            if self._lock is not None:  # its timeout is a driver error too, mapped below
                self._lock.hold(conn.info)
            cursor = dbapi_conn.cursor()
            cursor.execute(self._sql, args)
            row = cursor.fetchone()
        except self._dbapi_error as exc:
            disconnected = conn.dialect.is_disconnect(cast(Any, exc), dbapi_conn, cursor)
            if disconnected:
                conn.invalidate(exc)
            raise DBAPIError.instance(self._sql, args, exc, self._dbapi_error,
                                      connection_invalidated=disconnected) from exc
        finally:
            if cursor is not None:
                cursor.close()
        return tuple(row) if row is not None else None


class _WriterLock:
    """Serializes SQLite writers across threads (a lock) and processes (``flock``).

    SQLite lets one writer in at a time; the others sleep in its busy handler (1, 2, 5, 10 …
    ms) and retry, which under concurrency costs more than the writes themselves.  Writers of
    this service instead queue here: the lock is taken right before a transaction's first
    write statement and released when it commits or rolls back, so a waiter runs as soon as
    the previous writer is done.  Readers never take it (WAL lets them run beside a writer).
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self._path = path
        self._timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def install(self, engine: Engine) -> None:
        event.listen(engine, "before_cursor_execute", self._before_execute)
        event.listen(engine, "commit", self._release_conn)
        event.listen(engine, "rollback", self._release_conn)
        event.listen(engine, "checkin", self._release_record)
        event.listen(engine, "invalidate", self._release_invalidated)

    def _before_execute(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if conn.info.get(_HELD) or not statement.lstrip()[:7].upper().startswith(_DML):
            return
        self.hold(conn.info)

    def hold(self, info: dict[str, Any]) -> None:
        """Take the lock for the transaction of the connection whose ``info`` this is (kept
        until it commits or rolls back); nothing when that transaction holds it already."""
        if info.get(_HELD):
            return
        self._acquire()
        info[_HELD] = True

    def _acquire(self) -> None:
        deadline = time.monotonic() + self._timeout
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise sqlite3.OperationalError("database is locked (writer queue timed out)")
        try:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
            pause = 0.0002
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise sqlite3.OperationalError(
                            "database is locked (another process holds the writer lock)"
                        ) from None
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self, info: dict[str, Any]) -> None:
        if info.pop(_HELD, False):
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._thread_lock.release()

    def _release_conn(self, conn: Any) -> None:
        self._release(conn.info)

    def _release_record(self, _dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            self._release(record.info)

    def _release_invalidated(self, _dbapi_conn: Any, record: Any, _exc: Any) -> None:
        self._release(record.info)


def _private_sqlite_files(path: Path) -> None:
    """The database file and its companions are the owner's alone (0600, directory 0700).

    SQLite creates ``-wal`` and ``-shm`` with the main file's permissions, so creating that
    file 0600 before the first connection covers them; files left more open by an older
    version are tightened.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for f in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        try:
            if f.stat().st_mode & 0o077:
                f.chmod(0o600)
        except FileNotFoundError:
            continue


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers run beside the single writer; synchronous=NORMAL is durable across
    # process crashes in WAL mode (a power loss can lose the last transactions, documented).
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
