"""Reason codes of the MCP gateway (``docs/gateway.md``).

The gateway answers the agent runtime over MCP, not HTTP; ``status`` is the HTTP family the
same refusal would have on the API, for consistency of the hierarchy.
"""

from __future__ import annotations

from sandboxsec.errors import (
    DependencyUnavailableError,
    ForbiddenError,
    InputError,
    SandboxSecError,
)

__all__ = [
    "GatewayArgumentsInvalidError",
    "GatewayMappingInvalidError",
    "GatewayOutcomeUnknownError",
    "GatewaySessionKeyUnavailableError",
    "GatewayToolUnmappedError",
]


class GatewayArgumentsInvalidError(InputError):
    """The tool call's arguments are not a JSON object that fits the tool's input schema and
    has one canonical form (no floats beyond what JCS writes, integers within 2^53 - 1)."""

    code = "gateway_arguments_invalid"


class GatewayMappingInvalidError(InputError):
    """The tool mapping file is malformed, or a call's arguments do not fill the mapping."""

    code = "gateway_mapping_invalid"


class GatewayToolUnmappedError(ForbiddenError):
    """The tool has no mapping to an action: the gateway neither lists nor forwards it."""

    code = "gateway_tool_unmapped"


class GatewayOutcomeUnknownError(SandboxSecError):
    """A forwarded call lost its answer: it may have run; the grant stays used."""

    code = "gateway_outcome_unknown"
    status = 502


class GatewaySessionKeyUnavailableError(DependencyUnavailableError):
    """The session key could not be reached in the sandbox's TPM (no TPM at the TCTI, no key
    at the persistent handle, a saved context from another TPM or boot): nothing is served."""

    code = "gateway_session_key_unavailable"
