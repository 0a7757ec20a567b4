"""What a gateway grant is bound to, computed without I/O.

A tool call is bound to ``SHA-256(JCS({"server", "tool", "tool_sha256", "arguments"}))``
(RFC 8785), where ``tool_sha256`` is the SHA-256 of the JCS form of the tool's definition as
the upstream listed it.  Any change to the arguments, to the tool's definition or to the
server name changes the binding, so an approval never covers anything but the exact call.

The gateway forwards :attr:`CanonicalCall.arguments`, the arguments parsed back from the
canonical bytes it hashed, never the runtime's original object: the tool server executes
exactly what was bound (JCS writes ``500.0`` as ``500``; the tool gets ``500``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785

from sandboxsec.gateway.errors import GatewayArgumentsInvalidError

__all__ = ["CanonicalCall", "canonical_call", "jcs", "tool_sha256"]


def jcs(value: Any) -> bytes:
    """RFC 8785 bytes of ``value``; :class:`GatewayArgumentsInvalidError` when it has none
    (integers beyond 2^53 - 1, NaN, infinities, non-string keys)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise GatewayArgumentsInvalidError(f"no canonical JSON form: {exc}") from None


def tool_sha256(definition: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the JCS form of a tool definition (as listed: name, schema, ...)."""
    return hashlib.sha256(jcs(dict(definition))).hexdigest()


@dataclass(frozen=True)
class CanonicalCall:
    """A tool call in its one canonical form, and the digests derived from it."""

    server: str
    tool: str
    tool_sha256: str
    arguments: dict[str, Any]
    arguments_sha256: str
    binding: str


def canonical_call(server: str, tool: str, definition_sha256: str,
                   arguments: object) -> CanonicalCall:
    """Canonicalize ``arguments`` (a JSON object) and bind them to the server and tool."""
    if not isinstance(arguments, Mapping):
        raise GatewayArgumentsInvalidError("tool arguments must be a JSON object")
    raw = jcs(dict(arguments))
    canonical = json.loads(raw)
    binding = jcs({"server": server, "tool": tool, "tool_sha256": definition_sha256,
                   "arguments": canonical})
    return CanonicalCall(server=server, tool=tool, tool_sha256=definition_sha256,
                         arguments=canonical,
                         arguments_sha256=hashlib.sha256(raw).hexdigest(),
                         binding=hashlib.sha256(binding).hexdigest())
