"""Helpers shared by command modules."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sandboxsec.services import Services

__all__ = ["open_services", "print_json"]


def open_services() -> Services:
    """Services from the environment, schema migrated (the embedded default when unset)."""
    # Imported here: the composition root loads every domain, and commands that need none
    # (the offline ``audit verify``, ``image``) must start without them.
    from sandboxsec.services import Services

    services = Services()
    services.settings.ensure_home()
    services.db.migrate()
    return services


def print_json(value: Any) -> None:
    """Pretty JSON on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
