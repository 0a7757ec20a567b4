"""The ``sandboxsec`` command line.  Each command group lives in its own module.

Exit codes (docs/operations.md):

* 0 success;
* 1 a verification said no;
* 2 usage or input error;
* 3 a setting is invalid (bad value, unsupported database URL);
* 4 a service the command needs failed (database unreachable, key provider);
* 5 the database is missing or its schema is not this version's (run ``sandboxsec migrate``);
* 6 this node's keys are not the cluster's (``node_identity_mismatch``: another root key, HSM
  or service key file than the nodes already on this database).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from sandboxsec import __version__
from sandboxsec.errors import ConfigurationError, SandboxSecError

__all__ = ["GROUPS", "main"]

#: Command-group modules under ``sandboxsec.cli``; each has ``register(subparsers)``.
GROUPS = ("serve", "migrate", "tenant", "apikey", "policy", "image", "audit", "keys", "demo",
          "witness", "gateway")

EXIT_OK = 0
EXIT_VERIFICATION = 1
EXIT_USAGE = 2
EXIT_CONFIGURATION = 3
EXIT_DEPENDENCY = 4
EXIT_SCHEMA = 5
EXIT_NODE_IDENTITY = 6


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser: every group that is installed, or just the group ``only``.

    A command names its group first, and each group module imports what its commands need
    (the service's storage, policy engine, web framework...), so parsing one group's command
    imports that group alone: a witness, the gateway or an auditor's ``audit verify`` start
    in a fraction of the time the whole command set takes to import.
    """
    parser = _Parser(prog="sandboxsec", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sandboxsec {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    for name in GROUPS if only is None else (only,):
        try:
            module = importlib.import_module(f"sandboxsec.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sandboxsec.cli.{name}":
                continue
            raise
        module.register(subs)
    return parser


def exit_code(exc: SandboxSecError) -> int:
    """The exit code of a command that failed with ``exc`` (see the module docstring)."""
    from sandboxsec.crypto.errors import NodeIdentityMismatchError
    from sandboxsec.storage.db import DatabaseMissingError, SchemaNotCurrentError

    if isinstance(exc, DatabaseMissingError | SchemaNotCurrentError):
        return EXIT_SCHEMA
    if isinstance(exc, NodeIdentityMismatchError):
        return EXIT_NODE_IDENTITY
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIGURATION
    if exc.status >= 500:
        return EXIT_DEPENDENCY
    return EXIT_VERIFICATION if exc.status == 422 else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns (and, as a script, exits with) its exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    group = words[0] if words and words[0] in GROUPS else None
    args = build_parser(group).parse_args(words)
    if args.command != "serve":
        from sandboxsec.multiproc import leave_multiprocess_mode

        leave_multiprocess_mode()
    audited = _audited(args)
    try:
        if audited:
            _operator_record(args, "started")
        code: int = args.handler(args)
    except SandboxSecError as exc:
        if audited:
            _operator_record(args, "failure", exc.reason, quiet=True)
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly instead of printing a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        from sqlalchemy.exc import DBAPIError

        if not isinstance(exc, DBAPIError):
            raise
        # A database failure outside a request (connecting, a lock): one line, its own code.
        print(f"error: database_unavailable: the database failed ({type(exc.orig).__name__})",
              file=sys.stderr)
        return EXIT_DEPENDENCY
    if audited:
        try:
            _operator_record(args, "success" if code == 0 else "failure")
        except SandboxSecError as exc:
            print(f"error: {exc.reason}: the command ran but its outcome could not be "
                  "recorded in the service log", file=sys.stderr)
            return 2
    return code


def _audited(args: argparse.Namespace) -> bool:
    from sandboxsec.cli.operator_log import AUDITED_COMMANDS, command_name

    return command_name(args) in AUDITED_COMMANDS


def _operator_record(args: argparse.Namespace, outcome: str, reason: str | None = None, *,
                     quiet: bool = False) -> None:
    """Record an operator command in the service log (see :mod:`.operator_log`)."""
    from sandboxsec.cli._common import open_services
    from sandboxsec.cli.operator_log import record

    try:
        services = open_services()
        try:
            record(services, args, outcome, reason)
        finally:
            services.close()
    except SandboxSecError:
        if not quiet:
            raise


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
