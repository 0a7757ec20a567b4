"""A bare MCP proxy on stdio, built on the same SDK as ``sandboxsec gateway``: the floor of
what any gateway in its place adds to a tool call.

It lists the upstream's tools and forwards every call as it came, with no mapping, no
argument check, no decision, no proof and no logging.  ``bench/gateway.py`` times a call
through it next to a direct call and a call through the gateway: what it adds is the price of
one more stdio hop through the SDK, which every proxy between a runtime and a stdio tool
server pays before it does any work of its own.

Usage (as an MCP server on stdio): ``python bench/mcp_passthrough.py -- CMD ARGS...``
"""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import mcp_types as types
from mcp import Client, StdioServerParameters
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.stdio import stdio_server


def main() -> int:
    command = sys.argv[2:] if sys.argv[1:2] == ["--"] else sys.argv[1:]
    if not command:
        print("usage: mcp_passthrough.py -- CMD ARGS...", file=sys.stderr)
        return 2
    upstream_spec = StdioServerParameters(command=command[0], args=command[1:],
                                          env=dict(os.environ))

    async def serve() -> None:
        async with Client(upstream_spec, cache=None) as upstream:

            async def list_tools(_ctx: ServerRequestContext[Any],
                                 params: types.PaginatedRequestParams | None
                                 ) -> types.ListToolsResult:
                return await upstream.list_tools(cursor=params.cursor if params else None)

            async def call_tool(_ctx: ServerRequestContext[Any],
                                params: types.CallToolRequestParams) -> types.CallToolResult:
                return await upstream.session.call_tool(params.name, params.arguments)

            server: Server[Any] = Server("passthrough", on_list_tools=list_tools,
                                         on_call_tool=call_tool)
            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())

    anyio.run(serve)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
