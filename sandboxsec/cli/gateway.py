"""``sandboxsec gateway``: run the MCP gateway on stdio in front of one tool server.

The agent runtime starts this command as its MCP server; this command starts the real tool
server (the command after ``--``) and gates every call through the service.  The agent key is
read from ``SANDBOXSEC_AGENT_KEY`` (never from the command line, which other local users can
read in the process list).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sandboxsec.errors import InputError

__all__ = ["register"]


def register(subs: Any) -> None:
    """Add ``gateway``."""
    p = subs.add_parser("gateway", help="MCP proxy that asks the policy before each tool call",
                        description=__doc__)
    p.add_argument("--service", required=True, help="base URL of the sandboxsec service")
    p.add_argument("--session", required=True, help="the sandbox's session id")
    p.add_argument("--mapping", required=True, type=Path,
                   help="the tool server's mapping file (TOML, docs/gateway.md)")
    p.add_argument("--approval-wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long inside a call for a person's decision (default 0)")
    p.add_argument("--record", action="store_true",
                   help="store each forwarded call and its result in the trajectory")
    p.add_argument("upstream", nargs=argparse.REMAINDER,
                   help="-- COMMAND ARGS...: the tool server to start (stdio)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    # Imported here: the MCP SDK takes seconds to import, and every other command would pay.
    import anyio
    from mcp import StdioServerParameters
    from mcp.server.stdio import stdio_server

    from sandboxsec.gateway.mapping import load_mapping
    from sandboxsec.gateway.proxy import Gateway, GatewayConfig
    from sandboxsec.logging import configure_logging

    command = args.upstream[1:] if args.upstream[:1] == ["--"] else args.upstream
    if not command:
        raise InputError("name the tool server to start after --, e.g. -- python server.py")
    key = os.environ.get("SANDBOXSEC_AGENT_KEY", "")
    if not key:
        raise InputError("set SANDBOXSEC_AGENT_KEY to the sandbox's agent key")
    if not 0 <= args.approval_wait <= 55:
        raise InputError("--approval-wait must be between 0 and 55 seconds (runtimes time "
                         "calls out at 60)")
    # stdout carries the MCP protocol: logs go to stderr only.
    configure_logging(os.environ.get("SANDBOXSEC_LOG_LEVEL", "info"),
                      os.environ.get("SANDBOXSEC_LOG_FORMAT", "json"), stream=sys.stderr)
    mapping = load_mapping(args.mapping)
    config = GatewayConfig(service_url=args.service, agent_key=key, session_id=args.session,
                           approval_wait=args.approval_wait, record=args.record)
    # The tool server inherits the environment, less ours: the agent key never reaches it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    upstream = StdioServerParameters(command=command[0], args=command[1:], env=env)

    async def serve() -> None:
        async with Gateway(upstream, mapping, config) as gateway, \
                stdio_server() as (read, write):
            await gateway.server.run(read, write,
                                     gateway.server.create_initialization_options())

    anyio.run(serve)
    return 0
