"""The service log's record of what operators do at the command line.

Commands that change tenants or keys, or read a tenant's audit log out of the database, are
recorded in the service log (event ``operator:cli:run``) twice: before they run (outcome
``started``; if that cannot be written the command does not run: fail closed) and after (its
outcome and reason code).  The record names the command, its arguments (none of which are
secrets) and the operating-system user who ran it.
"""

from __future__ import annotations

import argparse
import getpass
import os
from typing import Any

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.record import SERVICE_LOG, AuditRecord

__all__ = ["AUDITED_COMMANDS", "command_name", "record"]

#: ``group subcommand`` names recorded in the service log.
AUDITED_COMMANDS = frozenset({
    "tenant create", "tenant delete", "tenant key",
    "keys rotate", "keys rewrap", "keys retire", "keys migrate",
    "audit export", "audit checkpoint",
})


def command_name(args: argparse.Namespace) -> str:
    """``group subcommand`` of parsed arguments."""
    group = str(getattr(args, "command", ""))
    sub = getattr(args, f"{group}_command", None)
    return f"{group} {sub}" if sub else group


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"handler", "command"}
    return {
        k: (str(v) if not isinstance(v, str | int | bool | float) and v is not None else v)
        for k, v in vars(args).items()
        if k not in skip and not k.endswith("_command")
    }


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def record(services: Any, args: argparse.Namespace, outcome: str,
           reason: str | None = None) -> None:
    """Append one ``operator:cli:run`` entry to the service log (raises if it cannot)."""
    services.audit.append(AuditRecord(
        event=AuditEvent.OPERATOR_COMMAND, tenant_id=SERVICE_LOG, actor_key_id=None,
        actor_role="operator", outcome=outcome, reason=reason,
        body={"command": command_name(args), "args": _arguments(args),
              "os_user": _os_user(), "pid": os.getpid()},
    ))
