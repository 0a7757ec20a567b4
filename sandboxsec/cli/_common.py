"""Helpers shared by command modules: settings, the database, output formats.

Every command reads the same settings as the server (``SANDBOXSEC_*``), says on stderr which
database it uses, and never creates or migrates a database: only ``sandboxsec migrate`` and
``serve`` (see ``serve.py``) do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandboxsec.display import visible
from sandboxsec.errors import ConfigurationError

# The composition root, the settings and the database stack are imported where they are
# used: commands that need none of them (the offline ``audit verify``, ``image``) start
# without loading every domain.
if TYPE_CHECKING:
    from sandboxsec.services import Services
    from sandboxsec.settings import Settings

__all__ = ["OUTPUT_FORMATS", "describe_database", "emit", "load_settings", "open_services",
           "print_json", "sqlite_path"]

OUTPUT_FORMATS = ("table", "json")


def load_settings() -> Settings:
    """The settings from the environment, or one clear :class:`ConfigurationError`."""
    from pydantic import ValidationError

    from sandboxsec.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:3]:
            name = "SANDBOXSEC_" + "_".join(str(p) for p in err.get("loc", ())).upper()
            # The message only: never the value, which may be a password.
            problems.append(f"{name}: {err.get('msg', 'invalid')}")
        raise ConfigurationError("; ".join(problems)) from None


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (``None`` for other databases or an in-memory one)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database \
            or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def describe_database(settings: Settings) -> str:
    """Which database the settings select, without its password."""
    from sqlalchemy.engine import make_url

    url = settings.resolved_database_url()
    path = sqlite_path(url)
    if path is not None:
        source = "SANDBOXSEC_DATABASE_URL" if settings.database_url else "the embedded default"
        return f"SQLite {path} ({source})"
    shown = make_url(url).set(drivername="postgresql").render_as_string(hide_password=True)
    return f"PostgreSQL {shown}"


def open_services(*, migrate: bool = False, check_schema: bool = True,
                  announce: bool = True) -> Services:
    """Services on the configured database, which must exist with the current schema.

    Nothing is created unless ``migrate`` (``sandboxsec migrate``, ``serve``): a command run
    with the wrong settings says so instead of starting an empty database whose keys the
    server would never accept.
    """
    from sandboxsec.services import Services
    from sandboxsec.storage.db import DatabaseMissingError

    settings = load_settings()
    if announce:  # (``serve`` with JSON logs says it in its first log line instead)
        print(f"sandboxsec: database {describe_database(settings)}", file=sys.stderr)
    path = sqlite_path(settings.resolved_database_url())
    if not migrate and path is not None and not path.exists():
        raise DatabaseMissingError(
            f"there is no database at {path}: check SANDBOXSEC_HOME / SANDBOXSEC_DATABASE_URL "
            "(the server's settings), or create it with `sandboxsec migrate`")
    if migrate:
        settings.ensure_home()
    services = Services(settings)
    try:
        if migrate:
            services.db.migrate()
        elif check_schema:
            services.db.require_current_schema()
    except BaseException:
        services.close()
        raise
    return services


def print_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    # Names and labels come from users: a terminal must not interpret them (escape
    # sequences, bidi controls), so anything that does not display as itself is written out.
    return visible(str(value))


def emit(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """Print a listing as JSON (a list of objects) or as an aligned table."""
    if fmt == "json":
        print_json([dict(r) for r in rows])
        return
    cells = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))
                         .rstrip() + "\n")
