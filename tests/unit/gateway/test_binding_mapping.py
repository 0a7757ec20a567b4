"""The gateway's pure parts: canonical arguments, the grant binding, the mapping file."""

from __future__ import annotations

import pytest

from sandboxsec.gateway.binding import canonical_call, tool_sha256
from sandboxsec.gateway.errors import GatewayArgumentsInvalidError, GatewayMappingInvalidError
from sandboxsec.gateway.mapping import ServerMapping

TOOL = tool_sha256({"name": "pay", "inputSchema": {"type": "object"}})
MAPPING = ServerMapping.from_toml("""
server = "payments"
[tools.pay]
action = "payment"
resource = "payee:{payee}"
params = ["amount", "payee"]
[tools.read]
action = "read"
resource = "account:{account}"
""")


def test_binding_covers_server_tool_definition_and_every_argument() -> None:
    base = canonical_call("payments", "pay", TOOL, {"amount": "1.00", "payee": "acme"})
    assert canonical_call("payments", "pay", TOOL,
                          {"payee": "acme", "amount": "1.00"}).binding == base.binding
    for other in (
        canonical_call("payments", "pay", TOOL, {"amount": "1.01", "payee": "acme"}),
        canonical_call("payments", "pay", TOOL, {"amount": "1.00", "payee": "acme",
                                                 "note": ""}),
        canonical_call("payments-2", "pay", TOOL, {"amount": "1.00", "payee": "acme"}),
        canonical_call("payments", "refund", TOOL, {"amount": "1.00", "payee": "acme"}),
        # the same tool name with a changed definition: a new binding, a new approval
        canonical_call("payments", "pay", tool_sha256({"name": "pay", "inputSchema": {
            "type": "object", "description": "now pays twice"}}),
            {"amount": "1.00", "payee": "acme"}),
    ):
        assert other.binding != base.binding


def test_forwarded_arguments_are_the_canonical_ones() -> None:
    # JCS writes 500.0 as 500: the tool receives exactly what was bound
    call = canonical_call("s", "t", TOOL, {"amount": 500.0, "nested": {"b": 1, "a": [2.5]}})
    assert call.arguments == {"amount": 500, "nested": {"a": [2.5], "b": 1}}
    assert type(call.arguments["amount"]) is int
    assert call.binding == canonical_call("s", "t", TOOL, call.arguments).binding


@pytest.mark.parametrize("arguments", [
    {"n": 2**53},                      # beyond what every JSON parser reads the same
    {"n": -(2**53)},
    {"x": float("nan")},
    {"x": float("inf")},
    ["not", "an", "object"],
    "text",
    None,
])
def test_arguments_without_one_canonical_form_are_refused(arguments: object) -> None:
    with pytest.raises(GatewayArgumentsInvalidError):
        canonical_call("s", "t", TOOL, arguments)


def test_mapping_builds_the_action_request() -> None:
    call = canonical_call("payments", "pay", TOOL,
                          {"amount": 12.5, "payee": "acme", "memo": "x"})
    req = MAPPING.tools["pay"].request(call)
    assert (req.action, req.resource) == ("payment", "payee:acme")
    # floats travel as their JCS text (the policy refuses floats); unselected args stay out
    assert req.params["amount"] == "12.5" and "memo" not in req.params
    assert req.params["mcp"] == {"server": "payments", "tool": "pay", "tool_sha256": TOOL,
                                 "arguments_sha256": call.arguments_sha256,
                                 "binding": call.binding}
    # without a params list every argument is shown to the approver
    read = MAPPING.tools["read"].request(canonical_call("payments", "read", TOOL,
                                                        {"account": "{payee}", "n": 1}))
    assert read.resource == "account:{payee}"  # a value is never expanded again
    assert set(read.params) == {"account", "n", "mcp"}


@pytest.mark.parametrize("arguments", [{"amount": "1"}, {"amount": "1", "payee": True},
                                       {"amount": "1", "payee": {"a": 1}}])
def test_resource_needs_a_plain_argument(arguments: dict[str, object]) -> None:
    with pytest.raises(GatewayArgumentsInvalidError):
        MAPPING.tools["pay"].request(canonical_call("payments", "pay", TOOL, arguments))


def test_argument_named_like_the_binding_is_refused() -> None:
    call = canonical_call("payments", "read", TOOL, {"account": "a", "mcp": {"binding": "x"}})
    with pytest.raises(GatewayMappingInvalidError):
        MAPPING.tools["read"].request(call)


@pytest.mark.parametrize("text", [
    "",
    "server = 'p'",
    "server = 'p'\n[tools.x]\naction = 'pay'",
    "server = 'p'\n[tools.x]\naction = 'pay'\nresource = 'r'\nextra = 1",
    "server = 'p'\n[tools.x]\naction = 'pay ment'\nresource = 'r'",
    "server = 'p'\n[tools.x]\naction = 'pay'\nresource = 'r'\nparams = ['mcp']",
    "server = 'bad name!'\n[tools.x]\naction = 'pay'\nresource = 'r'",
    "server = = broken",
])
def test_malformed_mapping_files_are_refused(text: str) -> None:
    with pytest.raises(GatewayMappingInvalidError):
        ServerMapping.from_toml(text)
