"""The gateway against a hostile runtime and a lying tool server, with the real service.

A call that differs from the approved one only in spelling (JSON number form, member order)
is the same canonical call: it runs once, with exactly the approved canonical arguments.  A
call that differs in bytes the person may not see (Unicode normalisation) is another call and
needs its own approval.  A message with a repeated member name is refused before anything
parses it.  A grant is never good for another tool, nor twice.  An upstream that lists a tool
twice or never ends its list gets nothing offered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from sandboxsec_client import AgentClient, AsyncApproverClient, DownstreamClient

from sandboxsec.gateway.mapping import ServerMapping
from sandboxsec.gateway.proxy import Gateway, GatewayConfig
from tests.integration.clients.conftest import Live, SwtpmKeySandbox, release_tpm
from tests.integration.clients.test_gateway import (
    MAPPING,
    PAY,
    TOOL_SERVER,
    ToolLog,
    _approval_id,
    _text,
)
from tests.support.sessionkeys import KEYS

MAPPING_ALL = MAPPING + """
[tools.transfer]
action = "payment"
resource = "payee:{payee}"
"""


def _upstream(tmp_path: Path, mode: str = "") -> tuple[StdioServerParameters, ToolLog]:
    log = ToolLog(tmp_path / "executed.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env.update({"TOOL_LOG": str(log.path), "TOOL_MODE": mode})
    return StdioServerParameters(command=sys.executable, args=[str(TOOL_SERVER)],
                                 env=env), log


def _gateway(live: Live, sid: str, params: StdioServerParameters,
             mapping: str = MAPPING_ALL) -> Gateway:
    config = GatewayConfig(live.base, live.key("agent"), sid, session_key=KEYS[sid])
    return Gateway(params, ServerMapping.from_toml(mapping), config)


def test_spelling_of_numbers_and_member_order_run_the_approved_call_once(
        reads_allowed: Live, tmp_path: Path) -> None:
    live = reads_allowed
    params, executed = _upstream(tmp_path)
    sid = live.new_session()
    approved = {"amount": 120, "currency": "EUR", "payee": "acme-gmbh"}

    async def run() -> None:
        async with _gateway(live, sid, params) as gw, Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            aid = _approval_id(await runtime.call_tool("transfer", approved))
            decided = await approver.approve(await approver.get(aid))
            assert decided.state == "approved", decided
            # the same call spelled otherwise: 120.0 for 120, members in another order
            r = await runtime.call_tool("transfer", {"payee": "acme-gmbh", "currency": "EUR",
                                                     "amount": 120.0})
            assert not r.is_error, _text(r)
            # the grant is used: any spelling of it now needs a new approval
            r = await runtime.call_tool("transfer", {**approved, "amount": 1.2e2})
            assert r.is_error and _approval_id(r) != aid

    anyio.run(run)
    calls = executed.calls("transfer")
    # exactly the approved canonical arguments, once: 120 as the integer JCS writes
    assert calls == [{"tool": "transfer", "arguments": approved}]
    assert type(calls[0]["arguments"]["amount"]) is int


def test_unicode_normalisation_is_another_call(reads_allowed: Live, tmp_path: Path) -> None:
    live = reads_allowed
    params, executed = _upstream(tmp_path)
    sid = live.new_session()
    word = "café zürich"
    nfc = {**PAY, "note": unicodedata.normalize("NFC", word)}
    nfd = {**PAY, "note": unicodedata.normalize("NFD", word)}
    assert nfc != nfd

    async def run() -> None:
        async with _gateway(live, sid, params) as gw, Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            aid = _approval_id(await runtime.call_tool("pay", nfc))
            await approver.approve(await approver.get(aid))
            # the same-looking note in other code points: another call, its own approval
            r = await runtime.call_tool("pay", nfd)
            assert r.is_error and "approval required" in _text(r)
            other = await approver.get(_approval_id(r))
            assert other.id != aid and other.params["note"] == nfd["note"]
            # a payee (the resource) not in NFC is refused by the service outright
            r = await runtime.call_tool("pay", {**PAY, "payee": unicodedata.normalize(
                "NFD", "zürich-bank")})
            assert r.is_error and "action_target_invalid" in _text(r)
            assert (await approver.get(aid)).state == "approved"  # its grant is untouched

    anyio.run(run)
    assert executed.calls() == []


def test_a_grant_is_good_for_one_tool_once(reads_allowed: Live, tmp_path: Path) -> None:
    live = reads_allowed
    params, executed = _upstream(tmp_path)
    sid = live.new_session()
    key = live.key("agent")
    agent = AgentClient(live.base, key, proof=live.prove("agent"))
    downstream = DownstreamClient(live.base, key, proof=live.prove("agent"))

    async def run() -> None:
        async with _gateway(live, sid, params) as gw, Client(gw.server) as runtime, \
                AsyncApproverClient(live.base, live.key("approver")) as approver:
            aid = _approval_id(await runtime.call_tool("pay", PAY))
            await approver.approve(await approver.get(aid))
            approval = agent.approval(aid)
            assert approval.grant is not None
            # the same arguments bound to another tool: not what was approved
            elsewhere = json.loads(json.dumps(approval.params))
            elsewhere["mcp"]["tool"] = "transfer"
            check = downstream.verify_grant(approval.grant, "payment", elsewhere,
                                            approval.resource)
            assert not check.valid and check.code == "grant_params_mismatch"
            r = await runtime.call_tool("pay", PAY)
            assert not r.is_error, _text(r)
            # the grant the gateway used, replayed with exactly its params
            replay = downstream.verify_grant(approval.grant, "payment", approval.params,
                                             approval.resource)
            assert not replay.valid and replay.code == "grant_already_used"

    try:
        anyio.run(run)
    finally:
        agent.close()
        downstream.close()
    assert executed.calls("pay") == [{"tool": "pay", "arguments": PAY}]


@pytest.mark.parametrize("mode", ["twice", "endless"])
def test_a_lying_tool_list_offers_nothing_it_could_lie_about(
        reads_allowed: Live, tmp_path: Path, mode: str) -> None:
    live = reads_allowed
    params, executed = _upstream(tmp_path, mode)
    sid = live.new_session()

    async def run() -> None:
        async with _gateway(live, sid, params) as gw, Client(gw.server) as runtime:
            listed = {t.name for t in (await runtime.list_tools()).tools}
            # listed twice: `pay` under neither definition; endless: nothing at all
            assert listed == ({"get_balance", "transfer"} if mode == "twice" else set())
            with pytest.raises(MCPError) as refused:
                await runtime.call_tool("pay", {**PAY, "anything": "goes"})
            assert refused.value.code == INVALID_PARAMS

    anyio.run(run)
    assert executed.calls() == []


def test_repeated_member_names_are_refused_on_stdio(
        reads_allowed: Live, tpm_sandbox: SwtpmKeySandbox, tmp_path: Path) -> None:
    """Raw JSON-RPC to ``sandboxsec gateway``: a call whose arguments repeat ``amount`` (once
    plainly, once escaped) is answered -32602 and never reaches the tool server."""
    live = reads_allowed
    sid = live.new_session(tpm_sandbox)
    tcti = release_tpm(tpm_sandbox)
    mapping = tmp_path / "payments.toml"
    mapping.write_text(MAPPING)
    executed = ToolLog(tmp_path / "executed.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env.update({"TOOL_LOG": str(executed.path), "SANDBOXSEC_AGENT_KEY": live.key("agent"),
                "SANDBOXSEC_LOG_LEVEL": "warning"})
    lines = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]
    raw = [json.dumps(x) for x in lines]
    raw.append('{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_balance",'
               '"arguments":{"account":"main","account":"savings"}}}')
    raw.append('{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_balance",'
               '"arguments":{"account":"main","\\u0061ccount":"savings"}}}')
    raw.append('{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_balance",'
               '"arguments":{"account":"main"}}}')
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxsec.cli", "gateway", "--service", live.base,
         "--session", sid, "--tpm-tcti", tcti, "--session-key-handle",
         hex(SwtpmKeySandbox.HANDLE), "--mapping", str(mapping), "--", sys.executable,
         str(TOOL_SERVER)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    assert proc.stdin is not None and proc.stdout is not None
    answers: dict[int, dict[str, object]] = {}
    try:
        for line in raw:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        while len(answers) < 4:
            doc = json.loads(proc.stdout.readline())
            if "id" in doc:
                answers[doc["id"]] = doc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    for refused in (2, 3):
        error = answers[refused]["error"]
        assert isinstance(error, dict) and error["code"] == INVALID_PARAMS
        assert "gateway_arguments_invalid" in str(error["message"])
    assert "result" in answers[4]
    assert executed.calls() == [{"tool": "get_balance", "arguments": {"account": "main"}}]
