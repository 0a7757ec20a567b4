"""``sandboxsec serve``: the HTTP API."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
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
    from sandboxsec.multiproc import MULTIPROC_ENV, prepare_multiprocess_dir

    workers = max(1, args.workers)
    own_dir = None
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        # A directory the operator chose (the systemd unit's): every worker writes its
        # metrics there and /metrics sums them.  Made and emptied first, before anything
        # imports prometheus_client: files of an earlier run would be summed in.
        prepare_multiprocess_dir(Path(given))
    elif workers > 1:
        own_dir = prepare_multiprocess_dir(Path(tempfile.mkdtemp(prefix="sandboxsec-metrics-")))
    try:
        return _start(args, workers)
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)


def _start(args: argparse.Namespace, workers: int) -> int:
    import uvicorn

    # The schema is checked (or migrated) once, before any worker starts.  A configured
    # database (SANDBOXSEC_DATABASE_URL) is migrated only when asked (--migrate, or
    # `sandboxsec migrate`): a node must never upgrade a shared schema by surprise.  The
    # embedded default (an SQLite file under SANDBOXSEC_HOME, one machine) is created and
    # migrated on start, so `sandboxsec serve` works on a fresh machine.

    settings = load_settings()
    embedded = settings.database_url is None
    as_json = settings.log_format == "json"
    log = None
    if as_json:
        # One stream of JSON lines: these messages, then the server's and the workers'.  (A
        # refusal to start stays the CLI's one `error: <reason>: <message>` line.)
        from sandboxsec.logging import standalone_logger

        log = standalone_logger("sandboxsec.serve")
        log.info("database", database=describe_database(settings))
    services = open_services(migrate=args.migrate or embedded, announce=not as_json)
    try:
        # A key provider that cannot answer at all (PKCS#11 module missing, token absent,
        # wrong PIN) stops the start with its own exit code, as an unreachable database
        # does; a root key not made yet is fine (the first tenant key makes it).
        services.keys.has_root_key()
        # One identity for every node: create the cluster's service keys on the first start
        # (importing this node's old key files), or refuse to start with keys that differ.
        imported = services.service_keys.establish()
    finally:
        services.close()
    if imported:
        if log is not None:
            log.info("service_keys_imported", keys=list(imported))
        else:
            print(f"sandboxsec: imported this node's key files into the cluster's service "
                  f"keys: {', '.join(imported)}", file=sys.stderr)
    os.environ.setdefault("SANDBOXSEC_HOME", str(settings.home))
    url = f"http://{args.host}:{args.port}"
    # Session proofs name the URL the client called; behind a proxy set the external one.
    os.environ.setdefault("SANDBOXSEC_PUBLIC_URL", settings.public_url or url)
    prog = shutil.which("sandboxsec") or str(Path(sys.executable).with_name("sandboxsec"))
    env = f"SANDBOXSEC_HOME={settings.home}"
    if not embedded:
        env += " SANDBOXSEC_DATABASE_URL=<the same URL as this server>"
    first_key = f"{env} {prog} tenant create NAME"
    if log is not None:
        log.info(
            f"sandboxsec listening on {url}", url=url, openapi=f"{url}/openapi.json",
            home=str(settings.home),
            database=describe_database(settings), key_provider=settings.key_provider,
            next_step=f"first admin key: run `{first_key}` (the same settings as this server)")
    else:
        print(
            f"sandboxsec listening on {url}  (API {url}/v1, OpenAPI {url}/openapi.json)\n"
            f"  state: {settings.home}  database: {describe_database(settings)}  "
            f"key provider: {settings.key_provider}\n"
            f"  first admin key: run  `{first_key}`  (the same settings "
            f"as this server) and keep the printed keys",
            file=sys.stderr,
            flush=True,
        )
    from sandboxsec.api.protocol import GuardedHttpToolsProtocol

    _run(uvicorn, GuardedHttpToolsProtocol, args, workers, settings.log_level,
         settings.log_format)
    return 0


def _run(uvicorn: Any, protocol: Any, args: argparse.Namespace, workers: int,
         log_level: str, log_format: str) -> None:
    from sandboxsec.logging import stdlib_logging_config

    level = args.log_level or log_level
    uvicorn.run(
        "sandboxsec.api.asgi:app",
        http=protocol,
        host=args.host,
        port=args.port,
        workers=workers,
        log_level=level,
        # The server's own messages in the same format (and stream) as ours.
        log_config=stdlib_logging_config(level, log_format),
        access_log=False,
        timeout_graceful_shutdown=5,
    )
