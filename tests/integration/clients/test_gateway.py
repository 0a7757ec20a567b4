"""The MCP gateway end to end: a real MCP tool server over stdio, a real MCP client as the
agent runtime, the gateway between them and a real ``sandboxsec serve`` deciding.

What must hold: the read-only call passes; the payment waits for a person and then runs
exactly once with exactly the approved arguments; a changed amount after approval is not
run; a denied call never reaches the tool server; a used grant is not used twice; without
the service nothing is forwarded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolResult, TextContent
from sandboxsec_client import AdminClient, AsyncApproverClient

from sandboxsec.gateway.mapping import ServerMapping
from sandboxsec.gateway.proxy import Gateway, GatewayConfig
from tests.integration.clients.conftest import Live, SwtpmKeySandbox
from tests.integration.clients.conftest import release_tpm as _release
from tests.support.sessionkeys import KEYS

TOOL_SERVER = Path(__file__).with_name("tool_server.py")
MAPPING = """
server = "payments"

[tools.pay]
action = "payment"
resource = "payee:{payee}"

[tools.get_balance]
action = "read"
resource = "account:{account}"
"""
PAY = {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh"}


def _text(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


def _approval_id(result: CallToolResult) -> str:
    found = re.search(r"approval (\S+)\)", _text(result))
    assert found, _text(result)
    return found.group(1)


class ToolLog:
    """What the tool server executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        lines = [json.loads(x) for x in self.path.read_text().splitlines()]
        return [c for c in lines if tool is None or c["tool"] == tool]


@pytest.fixture
def upstream(tmp_path: Path) -> tuple[StdioServerParameters, ToolLog]:
    log = tmp_path / "executed.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    params = StdioServerParameters(command=sys.executable, args=[str(TOOL_SERVER)],
                                   env={**env, "TOOL_LOG": str(log)})
    return params, ToolLog(log)


def test_gateway_gates_every_tool_call(reads_allowed: Live,
                                       upstream: tuple[StdioServerParameters, ToolLog]) -> None:
    live = reads_allowed
    params, executed = upstream
    sid = live.new_session()
    config = GatewayConfig(live.base, live.key("agent"), sid, record=True,
                           session_key=KEYS[sid])

    async def run() -> None:
        async with Gateway(params, ServerMapping.from_toml(MAPPING), config) as gw, \
                Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            # only mapped tools are offered, with the upstream's own schemas
            listed = {t.name: t for t in (await runtime.list_tools()).tools}
            assert set(listed) == {"pay", "get_balance"}
            assert listed["pay"].input_schema["required"] == ["amount", "currency", "payee"]

            # 1. read-only: allowed by policy, forwarded at once
            r = await runtime.call_tool("get_balance", {"account": "main"})
            assert not r.is_error and "1000.00" in _text(r)
            assert executed.calls() == [{"tool": "get_balance", "arguments": {"account": "main"}}]

            # 2. payment: answered at once as pending, with the code a person compares
            r = await runtime.call_tool("pay", PAY)
            assert r.is_error and "approval required" in _text(r)
            assert "Retry the identical call" in _text(r)
            aid = _approval_id(r)
            assert executed.calls("pay") == []
            # an identical retry while pending finds the same request, not a new one
            again = await runtime.call_tool("pay", PAY)
            assert again.is_error and _approval_id(again) == aid

            # the person sees the exact arguments and what they are bound to, and approves
            shown = await approver.get(aid)
            assert {k: shown.params[k] for k in PAY} == PAY
            assert shown.params["mcp"]["server"] == "payments"
            assert shown.params["mcp"]["tool"] == "pay"
            assert shown.resource == "payee:acme-gmbh"
            await approver.approve(shown)

            # 3. a changed amount after approval: a new request, nothing runs
            changed = await runtime.call_tool("pay", {**PAY, "amount": "9000.00"})
            assert changed.is_error and "approval required" in _text(changed)
            changed_id = _approval_id(changed)
            assert changed_id != aid
            assert executed.calls("pay") == []

            # 4. the identical call: runs once, with exactly the approved arguments
            r = await runtime.call_tool("pay", PAY)
            assert not r.is_error, _text(r)
            assert _text(r) == "paid 120.00 EUR to acme-gmbh"
            assert executed.calls("pay") == [{"tool": "pay", "arguments": PAY}]
            state = await approver.get(aid)
            assert state.state == "consumed"

            # 5. the same call again: the grant is used up; a new approval is needed
            r = await runtime.call_tool("pay", PAY)
            assert r.is_error and "approval required" in _text(r)
            assert _approval_id(r) not in (aid, changed_id)
            assert len(executed.calls("pay")) == 1

            # 6. a person denies the changed amount: the retry is refused, never forwarded
            await approver.deny(await approver.get(changed_id))
            r = await runtime.call_tool("pay", {**PAY, "amount": "9000.00"})
            assert r.is_error and "denied" in _text(r)

            # 7. the policy denies outright: named rule, never forwarded
            r = await runtime.call_tool("pay", {**PAY, "amount": "20000.00"})
            assert r.is_error and "pay-over-limit" in _text(r)

            # 8. malformed calls are protocol errors, checked by the gateway, not the tool
            for name, args in (("pay", {**PAY, "amount": 120}),          # schema: a string
                               ("pay", {**PAY, "extra": "x"}),           # not in the schema
                               ("delete_account", {}),                   # not mapped
                               ("no_such_tool", {})):
                with pytest.raises(MCPError) as bad:
                    await runtime.call_tool(name, args)
                assert bad.value.code == INVALID_PARAMS
            assert len(executed.calls("pay")) == 1
            assert executed.calls("delete_account") == []

    anyio.run(run)

    # forwarded calls are in the session's trajectory, with their binding
    with AdminClient(live.base, live.key("admin")) as admin:
        records, _ = admin.trajectory(sid, kind="mcp.tool_call")
    tools = sorted(json.loads(r.data)["tool"] for r in records)
    assert tools == ["get_balance", "pay"]
    assert all(len(r.meta["binding"]) == 64 for r in records)


def test_gateway_forwards_nothing_without_the_service(
        live: Live, upstream: tuple[StdioServerParameters, ToolLog]) -> None:
    params, executed = upstream
    sid = live.new_session()
    # a closed port: the policy service cannot be asked
    config = GatewayConfig("http://127.0.0.1:9", live.key("agent"), sid, timeout=2,
                           session_key=KEYS[sid])

    async def run() -> None:
        async with Gateway(params, ServerMapping.from_toml(MAPPING), config) as gw, \
                Client(gw.server) as runtime:
            r = await runtime.call_tool("get_balance", {"account": "main"})
            assert r.is_error and "not forwarded" in _text(r)

    anyio.run(run)
    assert executed.calls() == []


def test_gateway_command_on_stdio(reads_allowed: Live, tpm_sandbox: SwtpmKeySandbox,
                                  tmp_path: Path) -> None:
    """``sandboxsec gateway`` as a runtime starts it: a subprocess speaking MCP on stdio,
    starting the tool server itself, signing every proof with the session key it reaches in
    the sandbox's TPM (TCTI and persistent handle); the agent key never reaches the tool
    server."""
    live = reads_allowed
    sid = live.new_session(tpm_sandbox)
    tcti = _release(tpm_sandbox)
    mapping = tmp_path / "payments.toml"
    mapping.write_text(MAPPING)
    executed = ToolLog(tmp_path / "executed.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env.update({"TOOL_LOG": str(executed.path), "SANDBOXSEC_AGENT_KEY": live.key("agent"),
                "SANDBOXSEC_LOG_LEVEL": "warning"})
    command = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandboxsec.cli", "gateway", "--service", live.base, "--session", sid,
              "--tpm-tcti", tcti, "--session-key-handle", hex(SwtpmKeySandbox.HANDLE),
              "--mapping", str(mapping), "--", sys.executable, str(TOOL_SERVER)],
        env=env)

    async def run() -> None:
        async with Client(command) as runtime:
            assert {t.name for t in (await runtime.list_tools()).tools} == {"pay",
                                                                          "get_balance"}
            r = await runtime.call_tool("get_balance", {"account": "main"})
            assert not r.is_error, _text(r)
            r = await runtime.call_tool("pay", PAY)
            assert r.is_error and "approval required" in _text(r)

    anyio.run(run)
    assert executed.calls() == [{"tool": "get_balance", "arguments": {"account": "main"}}]


def test_gateway_command_without_the_session_key(reads_allowed: Live,
                                                 tpm_sandbox: SwtpmKeySandbox,
                                                 tmp_path: Path) -> None:
    """A gateway that cannot reach the session's key serves nothing (exit 4, its reason);
    one that signs with another key of the same TPM is refused by the service."""
    live = reads_allowed
    sid = live.new_session(tpm_sandbox)
    # another key in the same TPM, persistent at another handle: not the session's key
    from tpm2_pytss.constants import ESYS_TR

    tpm_sandbox.tpm.new_session_key()
    assert tpm_sandbox.tpm.session_key_handle is not None
    tpm_sandbox.tpm.esapi.evict_control(ESYS_TR.OWNER, tpm_sandbox.tpm.session_key_handle,
                                        SwtpmKeySandbox.HANDLE + 1)
    tcti = _release(tpm_sandbox)
    mapping = tmp_path / "payments.toml"
    mapping.write_text(MAPPING)
    executed = ToolLog(tmp_path / "executed.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env.update({"TOOL_LOG": str(executed.path), "SANDBOXSEC_AGENT_KEY": live.key("agent"),
                "SANDBOXSEC_LOG_LEVEL": "warning"})
    base = [sys.executable, "-m", "sandboxsec.cli", "gateway", "--service", live.base,
            "--session", sid, "--tpm-tcti", tcti, "--mapping", str(mapping)]
    upstream = ["--", sys.executable, str(TOOL_SERVER)]
    out = subprocess.run([*base, "--session-key-handle", "0x81000999", *upstream], env=env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 4 and "gateway_session_key_unavailable" in out.stderr, out.stderr

    command = StdioServerParameters(
        command=sys.executable,
        args=[*base[1:], "--session-key-handle", hex(SwtpmKeySandbox.HANDLE + 1), *upstream],
        env=env)

    async def run() -> None:
        async with Client(command) as runtime:
            r = await runtime.call_tool("get_balance", {"account": "main"})
            assert r.is_error and "dpop_key_mismatch" in _text(r), _text(r)

    anyio.run(run)
    assert executed.calls() == []


def test_gateway_command_usage_errors(tmp_path: Path) -> None:
    mapping = tmp_path / "m.toml"
    mapping.write_text(MAPPING)
    base = [sys.executable, "-m", "sandboxsec.cli", "gateway", "--service", "http://x",
            "--session", "ses_1", "--mapping", str(mapping)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    for argv, extra, needle in (
        (base, {"SANDBOXSEC_AGENT_KEY": "k"}, "tool server"),           # no upstream
        ([*base, "--", "true"], {"SANDBOXSEC_AGENT_KEY": "k"}, "--session-key-handle"),
        ([*base, "--session-key-handle", "0x1234", "--", "true"], {"SANDBOXSEC_AGENT_KEY": "k"},
         "persistent handle"),
        ([*base, "--", "true"], {}, "SANDBOXSEC_AGENT_KEY"),            # no key
        ([*base, "--approval-wait", "120", "--", "true"], {"SANDBOXSEC_AGENT_KEY": "k"},
         "approval-wait"),
    ):
        out = subprocess.run(argv, env={**env, **extra}, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and needle in out.stderr, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("server = 'x'")
    out = subprocess.run([*base[:-1], str(bad), "--", "true"],
                         env={**env, "SANDBOXSEC_AGENT_KEY": "k"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "gateway_mapping_invalid" in out.stderr


def test_approved_call_runs_once_even_when_sent_twice_at_once(
        reads_allowed: Live, upstream: tuple[StdioServerParameters, ToolLog]) -> None:
    live = reads_allowed
    params, executed = upstream
    sid = live.new_session()
    config = GatewayConfig(live.base, live.key("agent"), sid, session_key=KEYS[sid])

    async def run() -> None:
        async with Gateway(params, ServerMapping.from_toml(MAPPING), config) as gw, \
                Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            aid = _approval_id(await runtime.call_tool("pay", PAY))
            await approver.approve(await approver.get(aid))
            results: list[CallToolResult] = []

            async def call() -> None:
                results.append(await runtime.call_tool("pay", PAY))

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(call)
            assert sorted(bool(r.is_error) for r in results) == [False, True, True]

    anyio.run(run)
    assert executed.calls("pay") == [{"tool": "pay", "arguments": PAY}]


def test_a_tool_changed_after_approval_is_not_run(
        reads_allowed: Live, upstream: tuple[StdioServerParameters, ToolLog]) -> None:
    live = reads_allowed
    params, executed = upstream
    sid = live.new_session()
    config = GatewayConfig(live.base, live.key("agent"), sid, session_key=KEYS[sid])

    async def run() -> None:
        async with Gateway(params, ServerMapping.from_toml(MAPPING), config) as gw, \
                Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            aid = _approval_id(await runtime.call_tool("pay", PAY))
            await approver.approve(await approver.get(aid))
            # the tool server is replaced by one whose `pay` promises something else
            Path(str(executed.path) + ".v2").write_text("")
            r = await runtime.call_tool("pay", PAY)
            assert r.is_error and "definition changed" in _text(r)
            # asking again binds the new definition: a new approval is needed
            r = await runtime.call_tool("pay", PAY)
            assert r.is_error and _approval_id(r) != aid
            assert (await approver.get(aid)).state == "approved"  # its grant was never used

    anyio.run(run)
    assert executed.calls("pay") == []
