"""``sandboxsec serve``: the HTTP API."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from sandboxsec.cli._args import decimal
from sandboxsec.cli._common import describe_database, load_settings, open_services

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``serve``."""
    p = subs.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=decimal, default=8000)
    p.add_argument("--workers", type=decimal, default=1, help="worker processes (default 1)")
    p.add_argument("--log-level", default=None)
    p.add_argument("--migrate", action="store_true",
                   help="create the database or upgrade its schema before serving (without "
                   "it, a configured database must be current: see `sandboxsec migrate`)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # The schema is checked (or migrated) once, before any worker starts.  A configured
    # database (SANDBOXSEC_DATABASE_URL) is migrated only when asked (--migrate, or
    # `sandboxsec migrate`): a node must never upgrade a shared schema by surprise.  The
    # embedded default (an SQLite file under SANDBOXSEC_HOME, one machine) is created and
    # migrated on start, so `sandboxsec serve` works on a fresh machine.
    settings = load_settings()
    embedded = settings.database_url is None
    services = open_services(migrate=args.migrate or embedded)
    try:
        # One identity for every node: create the cluster's service keys on the first start
        # (importing this node's old key files), or refuse to start with keys that differ.
        imported = services.service_keys.establish()
    finally:
        services.close()
    if imported:
        print(f"sandboxsec: imported this node's key files into the cluster's service keys: "
              f"{', '.join(imported)}", file=sys.stderr)
    os.environ.setdefault("SANDBOXSEC_HOME", str(settings.home))
    url = f"http://{args.host}:{args.port}"
    # Session proofs name the URL the client called; behind a proxy set the external one.
    os.environ.setdefault("SANDBOXSEC_PUBLIC_URL", settings.public_url or url)
    prog = shutil.which("sandboxsec") or str(Path(sys.executable).with_name("sandboxsec"))
    env = f"SANDBOXSEC_HOME={settings.home}"
    if not embedded:
        env += " SANDBOXSEC_DATABASE_URL=<the same URL as this server>"
    print(
        f"sandboxsec listening on {url}  (API {url}/v1, OpenAPI {url}/openapi.json)\n"
        f"  state: {settings.home}  database: {describe_database(settings)}  "
        f"key provider: {settings.key_provider}\n"
        f"  first admin key: run  `{env} {prog} tenant create NAME`  (the same settings "
        f"as this server) and keep the printed keys",
        file=sys.stderr,
        flush=True,
    )
    from sandboxsec.api.protocol import GuardedHttpToolsProtocol

    uvicorn.run(
        "sandboxsec.api.asgi:app",
        http=GuardedHttpToolsProtocol,
        host=args.host,
        port=args.port,
        workers=max(1, args.workers),
        log_level=args.log_level or settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0
