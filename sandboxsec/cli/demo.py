"""``sandboxsec demo``: the whole scenario against a freshly started service, step by step.

A new tenant; an image signed by its publisher; a swtpm-backed sandbox that attests and
starts a session; trajectory records; a login and a 120.00 EUR payment that need approval;
the approver approves one in the approval page and denies the other; the login grant
verifies once; the auditor's export verifies offline.  See
:mod:`sandboxsec.sandbox.scenario`.  Exit 0 only if every step behaved as expected, 1 if one
did not, 2 if the demo cannot run here (swtpm missing, bad option).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``demo``."""
    p = subs.add_parser(
        "demo",
        help="run the end-to-end scenario against a fresh service, printing each step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (state, keys, manifest, export, server log)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="use this directory instead of a temporary one")
    p.add_argument("--postgres-url", default=None, metavar="URL",
                   help="run the service on this (empty) PostgreSQL database, not SQLite")
    p.add_argument("--no-browser", action="store_true",
                   help="approve through the API instead of the approval page in Chromium")
    p.add_argument("--chromium", default="/usr/bin/chromium", metavar="PATH",
                   help="the Chromium executable for the approval page")
    p.set_defaults(handler=_demo)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the server, the vTPM and the temp dir are cleaned up.
    raise KeyboardInterrupt


def _demo(args: argparse.Namespace) -> int:
    # Imported here: `sandboxsec --help` and the other commands need none of this.
    from sandboxsec.sandbox import swtpm
    from sandboxsec.sandbox.scenario import ScenarioOptions, run_scenario

    if args.postgres_url and not args.postgres_url.startswith(("postgresql://", "postgres://",
                                                               "postgresql+psycopg://")):
        print("error: --postgres-url must be a postgresql:// URL", file=sys.stderr)
        return 2
    if args.workdir is not None and args.workdir.is_dir() and any(args.workdir.iterdir()):
        print(f"error: {args.workdir} is not empty: the demo starts from fresh state",
              file=sys.stderr)
        return 2
    if not swtpm.available():
        print("error: the demo needs swtpm (Debian: apt-get install swtpm swtpm-tools)",
              file=sys.stderr)
        return 2
    options = ScenarioOptions(
        workdir=args.workdir, keep=args.keep, postgres_url=args.postgres_url,
        browser=not args.no_browser, chromium_path=args.chromium,
    )
    previous = signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    try:
        result = run_scenario(options, out=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("interrupted: everything the demo started was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.ok:
        print(f"result: all {len(result.steps)} steps behaved as expected "
              f"({time.monotonic() - started:.1f} s)")
        return 0
    print(f"result: FAILED: {result.error}", file=sys.stderr)
    return 1
