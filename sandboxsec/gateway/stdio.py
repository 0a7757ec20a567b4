"""The gateway's stdio transport: the MCP SDK's, with every incoming line read strictly first.

JSON parsers disagree on a repeated member name (``{"amount": "1", "amount": "9000"}``): the
SDK keeps the last silently, a tool server written in another language may keep the first.
The gateway binds and forwards what it parsed, so it refuses such a message before the SDK
sees it, with a JSON-RPC error naming ``gateway_arguments_invalid`` (``-32602``; ``id`` is
the request's when it can be told, else ``null``).  The same holds for the non-JSON constants
``NaN`` and ``Infinity``.  Escaped spellings of one name (``"a"`` and ``"\\u0061"``) are the
same name and refused alike.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from io import TextIOWrapper
from typing import Any, cast

import anyio
from mcp.server.stdio import stdio_server

from sandboxsec.gateway.errors import GatewayArgumentsInvalidError

__all__ = ["refusal_of", "strict_stdio_server"]

_INVALID_PARAMS = -32602


class _Ambiguous(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Ambiguous("a member name is repeated")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Ambiguous(f"{name} is not JSON")


def _loose_id(line: str) -> Any:
    # The id to answer with, from a lenient parse (the strict one already failed).
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str | int) and not isinstance(value, bool) else None


def refusal_of(line: str) -> str | None:
    """The JSON-RPC error line answering ``line``, or ``None`` when ``line`` may pass (it is
    unambiguous, or not JSON at all: the SDK answers that itself)."""
    try:
        json.loads(line, object_pairs_hook=_pairs, parse_constant=_constant)
    except _Ambiguous as exc:
        error = {"code": _INVALID_PARAMS,
                 "message": f"{GatewayArgumentsInvalidError.code}: {exc}; not forwarded"}
        return json.dumps({"jsonrpc": "2.0", "id": _loose_id(line), "error": error}) + "\n"
    except (ValueError, RecursionError):
        return None
    return None


class _LockedOut:
    """stdout shared by the SDK's writer and the refusals: one whole line at a time."""

    def __init__(self, out: anyio.AsyncFile[str]) -> None:
        self._out = out
        self._lock = anyio.Lock()

    async def write(self, text: str) -> None:
        async with self._lock:
            await self._out.write(text)
            await self._out.flush()

    async def flush(self) -> None:
        """Each write flushes already."""


class _StrictLines:
    """stdin as the SDK iterates it, less the lines refused (answered on stdout instead)."""

    def __init__(self, lines: anyio.AsyncFile[str],
                 answer: Callable[[str], Awaitable[None]]) -> None:
        self._lines = lines
        self._answer = answer

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        async for line in self._lines:
            refusal = refusal_of(line)
            if refusal is None:
                yield line
            else:
                await self._answer(refusal)


@asynccontextmanager
async def strict_stdio_server() -> AsyncIterator[tuple[Any, Any]]:
    """:func:`mcp.server.stdio.stdio_server` over this process's stdin and stdout, with the
    strict reading above."""
    import sys

    stdin = anyio.wrap_file(TextIOWrapper(sys.stdin.buffer, encoding="utf-8",
                                          errors="replace"))
    out = _LockedOut(anyio.wrap_file(TextIOWrapper(sys.stdout.buffer, encoding="utf-8")))
    lines = _StrictLines(stdin, out.write)
    async with stdio_server(cast(Any, lines), cast(Any, out)) as streams:
        yield streams
