"""The mapping file of one tool server: which action, resource and params each tool is.

A small TOML file, one per upstream tool server (``docs/gateway.md``)::

    server = "payments"                   # bound into every grant for this server

    [tools.pay]
    action = "payment"                    # the policy's action
    resource = "payee:{payee}"            # {name} is replaced by that argument
    params = ["amount", "currency", "payee"]   # optional; default: every argument

    [tools.get_balance]
    action = "read"
    resource = "account:{account}"

Tools not in the file are neither listed nor forwarded.  The action's params are the selected
arguments (floats written as their JCS decimal text, since the policy refuses floats) plus
``mcp``: the server, tool, tool definition hash, arguments hash and the binding, so the
approver sees what is bound and the grant covers exactly this call.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxsec.gateway.binding import CanonicalCall, jcs
from sandboxsec.gateway.errors import GatewayArgumentsInvalidError, GatewayMappingInvalidError

__all__ = ["ActionRequest", "ServerMapping", "ToolMapping", "load_mapping"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]{1,64})\}")
_RESERVED = "mcp"


@dataclass(frozen=True)
class ActionRequest:
    """What the gateway asks ``POST /v1/actions``."""

    action: str
    resource: str
    params: dict[str, Any]


def _param(value: Any) -> Any:
    # The policy refuses floats (amounts are decimal strings): write them as JCS does.
    if isinstance(value, float):
        return jcs(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _param(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_param(v) for v in value]
    return value


@dataclass(frozen=True)
class ToolMapping:
    """One tool's action, resource template and selected params (``None``: all)."""

    action: str
    resource: str
    params: tuple[str, ...] | None

    def request(self, call: CanonicalCall) -> ActionRequest:
        """The action request for a canonical call of this tool."""
        args = call.arguments

        def fill(match: re.Match[str]) -> str:
            value = args.get(match.group(1))
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise GatewayArgumentsInvalidError(
                    f"argument {match.group(1)!r} must be a string or integer (it names the "
                    "resource)")
            return str(value)

        resource = _PLACEHOLDER.sub(fill, self.resource)
        names = self.params if self.params is not None else tuple(sorted(args))
        if _RESERVED in names:
            raise GatewayMappingInvalidError(f"argument name {_RESERVED!r} is reserved")
        params: dict[str, Any] = {n: _param(args[n]) for n in names if n in args}
        params[_RESERVED] = {"server": call.server, "tool": call.tool,
                             "tool_sha256": call.tool_sha256,
                             "arguments_sha256": call.arguments_sha256,
                             "binding": call.binding}
        return ActionRequest(self.action, resource, params)


@dataclass(frozen=True)
class ServerMapping:
    """The mapping of one upstream tool server."""

    server: str
    tools: Mapping[str, ToolMapping]

    @classmethod
    def from_toml(cls, text: str) -> ServerMapping:
        """Parse and check a mapping file's text."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise GatewayMappingInvalidError(f"mapping is not TOML: {exc}") from None
        server = doc.get("server")
        tools = doc.get("tools")
        if not isinstance(server, str) or not _NAME.fullmatch(server):
            raise GatewayMappingInvalidError("`server` must be a short name")
        if not isinstance(tools, dict) or not tools:
            raise GatewayMappingInvalidError("`tools` must map at least one tool")
        out: dict[str, ToolMapping] = {}
        for name, spec in tools.items():
            if not isinstance(spec, dict) or set(spec) - {"action", "resource", "params"}:
                raise GatewayMappingInvalidError(
                    f"tools.{name}: only action, resource and params are allowed")
            action, resource, params = spec.get("action"), spec.get("resource"), \
                spec.get("params")
            if not isinstance(action, str) or not _NAME.fullmatch(action):
                raise GatewayMappingInvalidError(f"tools.{name}.action must be a short name")
            if not isinstance(resource, str) or not 0 < len(resource) <= 512:
                raise GatewayMappingInvalidError(f"tools.{name}.resource must be a string")
            if params is not None and not (isinstance(params, list) and all(
                    isinstance(p, str) and p != _RESERVED for p in params)):
                raise GatewayMappingInvalidError(
                    f"tools.{name}.params must be a list of argument names (not {_RESERVED!r})")
            out[name] = ToolMapping(action, resource,
                                    tuple(params) if params is not None else None)
        return cls(server=server, tools=out)


def load_mapping(path: Path) -> ServerMapping:
    """Read a mapping file."""
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise GatewayMappingInvalidError(f"cannot read {path}: {exc.strerror}") from None
    return ServerMapping.from_toml(text)
