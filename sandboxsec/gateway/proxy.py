"""The MCP gateway: an MCP server in front of one upstream tool server.

The agent runtime connects to the gateway instead of the tool server.  The gateway lists the
upstream's mapped tools (their input schemas unchanged) and, for each ``tools/call``:

0. finds the tool's mapping and the definition the upstream listed (else ``-32602``);
1. validates the arguments against that input schema (the SDK does not: the gateway must);
2. canonicalizes them (RFC 8785) and binds them to server, tool and definition hash;
3. asks ``POST /v1/actions`` for the mapped action, resource and params, unless the same
   binding already waits for a person, then reads that approval instead;
4. ``deny``: an error result naming the rule; ``approval_required``: an error result with the
   short code, the approval id and "retry the identical call" (it does not hold the call
   open while a person decides, unless ``approval_wait`` says to wait a little); for an
   approved request, the upstream's tool list is read again and a changed definition refused;
5. for an approved request, uses the grant up with ``POST /v1/grants/verify`` against the
   exact params *before* forwarding (a second identical call finds it used);
6. forwards the canonical arguments once, never retrying: a lost answer is reported as an
   unknown outcome and the grant stays used;
7. records the result in the session's trajectory when asked to.

Whenever the service cannot be asked (down, 5xx, timeout), nothing is forwarded.  Logs carry
the binding and arguments digest, never the arguments.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import jsonschema
import mcp_types as types
import structlog
from mcp import Client, StdioServerParameters
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from sandboxsec_client import (
    ApiError,
    Approval,
    AsyncAgentClient,
    AsyncDownstreamClient,
    ClientError,
    SessionKeySigner,
    SessionProver,
)

from sandboxsec.errors import SandboxSecError
from sandboxsec.gateway.binding import CanonicalCall, canonical_call, tool_sha256
from sandboxsec.gateway.errors import (
    GatewayArgumentsInvalidError,
    GatewayOutcomeUnknownError,
    GatewayToolUnmappedError,
)
from sandboxsec.gateway.mapping import ActionRequest, ServerMapping, ToolMapping

__all__ = ["Gateway", "GatewayConfig"]

log = structlog.get_logger("sandboxsec.gateway")

#: Bound on remembered pending approvals (identical retries find theirs; old ones age out).
MAX_PENDING = 1024
_MAX_TOOL_PAGES = 100


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway reaches the service: base URL, the sandbox's agent key and session."""

    service_url: str
    agent_key: str
    session_id: str
    #: Seconds to wait for a person inside one call before answering "pending" (0: answer
    #: at once; keep well under the runtime's own call timeout, often 60 s).
    approval_wait: float = 0.0
    #: Store every forwarded call's result in the session's trajectory.
    record: bool = False
    timeout: float = 30.0
    #: The session's TPM-held key (:class:`sandboxsec_client.TpmSessionKey`): it signs the
    #: ``DPoP`` proof of every request acting in the session.  ``None`` only for a session
    #: that is not bound to a key (the service refuses those where binding is required).
    session_key: SessionKeySigner | None = None


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)],
                                is_error=True)


def _pending(short_code: str, approval_id: str) -> types.CallToolResult:
    return _error(f"approval required: a person must approve this call (code {short_code}, "
                  f"approval {approval_id}). Nothing was done. Retry the identical call once "
                  "it is approved.")


class Gateway:
    """The proxy for one upstream (``StdioServerParameters``, a URL, or an MCP server object
    for in-process use).  Use as ``async with Gateway(...) as gw``; ``gw.server`` is the
    low-level MCP server to run on stdio or hand to ``mcp.Client``."""

    def __init__(self, upstream: StdioServerParameters | str | Server[Any],
                 mapping: ServerMapping, config: GatewayConfig, *,
                 agent: AsyncAgentClient | None = None,
                 downstream: AsyncDownstreamClient | None = None) -> None:
        self._upstream_spec = upstream
        self.mapping = mapping
        self.config = config
        self._stack = AsyncExitStack()
        # One prover for both clients: proofs by the session key, for this session.
        prover = SessionProver(config.agent_key, config.session_key,
                               session_id=config.session_id)
        self._agent = agent or AsyncAgentClient(config.service_url, config.agent_key,
                                                timeout=config.timeout, proof=prover)
        # Any key may use a grant up; the gateway uses the sandbox's own.
        self._downstream = downstream or AsyncDownstreamClient(
            config.service_url, config.agent_key, timeout=config.timeout, proof=prover)
        self._upstream: Client | None = None
        self._tools: dict[str, tuple[types.Tool, str, jsonschema.protocols.Validator]] = {}
        self._pending: OrderedDict[str, str] = OrderedDict()
        self.server: Server[Any] = Server(
            "sandboxsec-gateway",
            instructions="Tool calls pass through sandboxsec: some need a person's approval. "
            "When a call answers that approval is pending, retry the identical call later.",
            on_list_tools=self._on_list_tools,
            on_call_tool=self._on_call_tool,
        )

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        self._stack.push_async_callback(self._agent.aclose)
        self._stack.push_async_callback(self._downstream.aclose)
        self._upstream = await self._stack.enter_async_context(
            Client(self._upstream_spec, cache=None))
        await self.refresh_tools()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    # -- tools --------------------------------------------------------------------------------

    async def refresh_tools(self) -> None:
        """Re-read the upstream's tools (every page); keep only mapped ones.

        What an upstream could use to lie is refused, not guessed at: a tool listed twice
        (which definition would the person have approved?) is offered under neither, and a
        list that does not end within ``_MAX_TOOL_PAGES`` pages offers nothing.
        """
        assert self._upstream is not None
        tools: dict[str, tuple[types.Tool, str, jsonschema.protocols.Validator]] = {}
        seen: set[str] = set()
        twice: set[str] = set()
        cursor: str | None = None
        for _ in range(_MAX_TOOL_PAGES):
            page = await self._upstream.list_tools(cursor=cursor)
            for tool in page.tools:
                if tool.name in seen:
                    twice.add(tool.name)
                seen.add(tool.name)
                if tool.name not in self.mapping.tools:
                    continue
                definition = tool.model_dump(mode="json", by_alias=True, exclude_none=True)
                schema = tool.input_schema
                cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
                try:
                    cls.check_schema(schema)
                except jsonschema.SchemaError:
                    log.warning("gateway_tool_schema_invalid", tool=tool.name)
                    continue  # a tool whose arguments cannot be checked is not offered
                tools[tool.name] = (tool, tool_sha256(definition), cls(schema))
            cursor = page.next_cursor
            if not cursor:
                break
        else:
            log.warning("gateway_tool_list_endless", pages=_MAX_TOOL_PAGES)
            tools = {}
        for name in twice:
            log.warning("gateway_tool_listed_twice", tool=name[:64])
            tools.pop(name, None)
        self._tools = tools

    async def _on_list_tools(self, _ctx: ServerRequestContext[Any],
                             _params: types.PaginatedRequestParams | None
                             ) -> types.ListToolsResult:
        await self.refresh_tools()
        return types.ListToolsResult(tools=[t for t, _, _ in self._tools.values()])

    # -- calls --------------------------------------------------------------------------------

    async def _on_call_tool(self, _ctx: ServerRequestContext[Any],
                            params: types.CallToolRequestParams) -> types.CallToolResult:
        # 0. mapping and definition
        # (one answer for unmapped and missing tools: the runtime learns nothing more)
        unknown = MCPError(INVALID_PARAMS, f"{GatewayToolUnmappedError.code}: no tool named "
                                           f"{params.name[:64]!r}")
        mapping = self.mapping.tools.get(params.name)
        if mapping is None:
            raise unknown
        if params.name not in self._tools:
            await self.refresh_tools()
        known = self._tools.get(params.name)
        if known is None:
            raise unknown
        _tool, definition_hash, validator = known
        arguments = params.arguments if params.arguments is not None else {}
        # 1. schema (messages name the failing place, never echo a value)
        error = next(iter(validator.iter_errors(arguments)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise MCPError(INVALID_PARAMS,
                           f"{GatewayArgumentsInvalidError.code}: {where} does not fit the "
                           "tool's "
                           f"input schema ({error.validator})")
        # 2. canonical form and binding
        try:
            call = canonical_call(self.mapping.server, params.name, definition_hash, arguments)
            request = mapping.request(call)
        except SandboxSecError as exc:
            raise MCPError(INVALID_PARAMS, f"{exc.reason}: {exc.message}") from None
        bound = log.bind(tool=params.name, binding=call.binding,
                         arguments_sha256=call.arguments_sha256)
        try:
            return await self._decide_and_forward(call, mapping, request, bound)
        except ClientError as exc:
            # 3. fail closed: without the service's word nothing is forwarded
            code = exc.code if isinstance(exc, ApiError) else type(exc).__name__
            bound.warning("gateway_policy_unreachable", error=code)
            return _error(f"not forwarded: the policy service could not decide ({code}); "
                          "nothing was done")

    async def _decide_and_forward(self, call: CanonicalCall, mapping: ToolMapping,
                                  request: ActionRequest,
                                  bound: Any
                                  ) -> types.CallToolResult:
        sid = self.config.session_id
        approval_id = self._pending.get(call.binding)
        if approval_id is None:
            decision = await self._agent.ask(sid, request.action, request.resource,
                                             request.params)
            bound.info("gateway_decision", decision=decision.decision,
                       rule_id=decision.rule_id)
            if decision.decision == "allow":
                return await self._forward(call, bound)
            if decision.decision != "approval_required" or decision.approval_id is None:
                # 4. deny
                return _error(f"denied by rule {decision.rule_id}: {decision.reason} "
                              f"(decision {decision.decision_id}); not forwarded")
            approval_id = decision.approval_id
            self._remember(call.binding, approval_id)
            if self.config.approval_wait <= 0:
                return _pending(decision.short_code, approval_id)
        approval = await self._look(approval_id)
        if approval.state == "pending":
            return _pending(approval.short_code, approval.id)
        if approval.state != "approved" or approval.grant is None:
            self._pending.pop(call.binding, None)
            return _error(f"not forwarded: the approval {approval.id} is {approval.state}")
        # 4b. the tool as it is now: a definition changed since the request was made (a new
        # description, a wider schema) is not what the person approved
        await self.refresh_tools()
        now = self._tools.get(call.tool)
        if now is None or now[1] != call.tool_sha256:
            self._pending.pop(call.binding, None)
            bound.warning("gateway_tool_changed")
            return _error("not forwarded: the tool's definition changed since it was "
                          "approved; call it again to ask for a new approval")
        # 5. use the grant up against exactly these params, before anything runs (a service
        # failure here raises and keeps the request remembered: the retry tries again, and a
        # grant that did get used on the lost attempt is then refused, never used twice)
        check = await self._downstream.verify_grant(approval.grant, request.action,
                                                    request.params, request.resource)
        self._pending.pop(call.binding, None)
        if not check.valid:
            bound.warning("gateway_grant_refused", code=check.code)
            return _error(f"not forwarded: the grant was refused ({check.code})")
        return await self._forward(call, bound)

    async def _look(self, approval_id: str) -> Approval:
        if self.config.approval_wait > 0:
            return await self._agent.wait(approval_id, timeout=self.config.approval_wait,
                                          poll=self.config.approval_wait)
        return await self._agent.approval(approval_id)

    def _remember(self, binding: str, approval_id: str) -> None:
        self._pending[binding] = approval_id
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    async def _forward(self, call: CanonicalCall,
                       bound: Any) -> types.CallToolResult:
        # 6. exactly once, exactly the canonical arguments; never retried
        assert self._upstream is not None
        outcome = "unknown"
        try:
            result = await self._upstream.session.call_tool(call.tool, call.arguments)
            outcome = "error" if result.is_error else "ok"
        except MCPError as exc:
            # The tool server answered with a protocol error: it did not run the tool.
            outcome = "refused"
            result = _error(f"the tool server refused the call: {exc.message}")
        except Exception as exc:  # the answer is lost, whatever happened upstream
            bound.error("gateway_outcome_unknown", error_type=type(exc).__name__)
            return _error(f"{GatewayOutcomeUnknownError.code}: the call was forwarded but its "
                          "answer was lost; it may have run. Do not retry blindly: check its "
                          "effect.")
        finally:
            bound.info("gateway_forwarded", outcome=outcome)
        # 7. trajectory
        if self.config.record:
            await self._record(call, result, bound)
        return result

    async def _record(self, call: CanonicalCall, result: types.CallToolResult,
                      bound: Any) -> None:
        data = json.dumps({
            "server": call.server, "tool": call.tool, "arguments": call.arguments,
            "result": result.model_dump(mode="json", by_alias=True, exclude_none=True),
        }, separators=(",", ":")).encode()
        meta: Mapping[str, Any] = {"binding": call.binding, "tool": call.tool,
                                   "is_error": bool(result.is_error)}
        try:
            await self._agent.record(self.config.session_id, "mcp.tool_call", data, meta)
        except ClientError as exc:
            # The call has run; losing its record must be visible to the operator.
            bound.error("gateway_record_failed", error_type=type(exc).__name__)
