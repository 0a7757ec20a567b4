"""The ``sandboxsec`` command line.  Each command group lives in its own module.

Exit codes: 0 success, 1 a verification said no, 2 usage or input error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from sandboxsec.errors import SandboxSecError

__all__ = ["GROUPS", "main"]

#: Command-group modules under ``sandboxsec.cli``; each has ``register(subparsers)``.
GROUPS = ("serve", "tenant", "image", "audit", "keys", "demo", "witness", "gateway")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every group that is installed)."""
    parser = _Parser(prog="sandboxsec", description=__doc__)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    for name in GROUPS:
        try:
            module = importlib.import_module(f"sandboxsec.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sandboxsec.cli.{name}":
                continue
            raise
        module.register(subs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns (and, as a script, exits with) its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except SandboxSecError as exc:
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1 if exc.status == 422 else 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly instead of printing a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
