"""``sandboxsec serve``: the HTTP API."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from sandboxsec.cli._args import decimal
from sandboxsec.cli._common import open_services

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``serve``."""
    p = subs.add_parser("serve", help="run the HTTP API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=decimal, default=8000)
    p.add_argument("--workers", type=decimal, default=1, help="worker processes (default 1)")
    p.add_argument("--log-level", default=None)
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # Migrate once, before any worker starts, so workers never race on the schema.
    services = open_services()
    settings = services.settings
    db_kind = "PostgreSQL" if services.db.is_postgres else f"SQLite {settings.home}/sandboxsec.db"
    services.close()
    os.environ.setdefault("SANDBOXSEC_HOME", str(settings.home))
    url = f"http://{args.host}:{args.port}"
    # Session proofs name the URL the client called; behind a proxy set the external one.
    os.environ.setdefault("SANDBOXSEC_PUBLIC_URL", settings.public_url or url)
    print(
        f"sandboxsec listening on {url}  (API {url}/v1, OpenAPI {url}/openapi.json)\n"
        f"  state: {settings.home}  database: {db_kind}  key provider: {settings.key_provider}\n"
        f"  first admin key: run  `.venv/bin/sandboxsec tenant create NAME`  (same "
        f"SANDBOXSEC_HOME) and keep the printed keys",
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
