"""``sandboxsec migrate``: create the database or bring its schema to this version."""

from __future__ import annotations

import argparse
from typing import Any

from sandboxsec.cli._common import open_services, print_json
from sandboxsec.storage.db import SchemaNotCurrentError

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``migrate``."""
    p = subs.add_parser(
        "migrate", help="create the database or upgrade its schema (safe on several nodes at "
        "once: one migrates, the others wait, then find nothing to do)")
    p.add_argument("--check", action="store_true",
                   help="only report where the schema stands; exit 5 unless it is current")
    p.set_defaults(handler=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    services = open_services(migrate=not args.check, check_schema=False)
    try:
        status = services.db.schema_status()
    finally:
        services.close()
    print_json({"current": status.current, "head": status.head,
                "up_to_date": status.up_to_date})
    if not status.up_to_date:
        raise SchemaNotCurrentError(
            f"{status.describe()}; run `sandboxsec migrate` with the same settings")
    return 0
