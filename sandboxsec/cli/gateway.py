"""``sandboxsec gateway``: run the MCP gateway on stdio in front of one tool server.

The agent runtime starts this command as its MCP server; this command starts the real tool
server (the command after ``--``) and gates every call through the service.  The agent key is
read from ``SANDBOXSEC_AGENT_KEY`` (never from the command line, which other local users can
read in the process list).

The session is bound to a key in the sandbox's TPM: the gateway signs every request's proof
with it.  Name the TPM with ``--tpm-tcti`` (tpm2-tools syntax; default ``device:/dev/tpmrm0``)
and the key with ``--session-key-handle`` (a persistent handle the attesting process made with
TPM2_EvictControl) or ``--session-key-context`` (a file with the key's TPM2_ContextSave, as
``TpmSessionKey.save_context`` writes it).  See docs/gateway.md.
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
    p.add_argument("--tpm-tcti", default="device:/dev/tpmrm0", metavar="TCTI",
                   help="the sandbox's TPM (tpm2-tools syntax, e.g. swtpm:host=H,port=P)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--session-key-handle", type=_handle, metavar="0x81XXXXXX",
                     help="persistent handle of the session's TPM-held key")
    key.add_argument("--session-key-context", type=Path, metavar="FILE",
                     help="saved context (TPM2_ContextSave) of the session's TPM-held key")
    p.add_argument("--record", action="store_true",
                   help="store each forwarded call and its result in the trajectory")
    p.add_argument("upstream", nargs=argparse.REMAINDER,
                   help="-- COMMAND ARGS...: the tool server to start (stdio)")
    p.set_defaults(handler=_run)


def _handle(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError("a persistent handle in hex, e.g. 0x81000100") from None
    if not 0x81000000 <= value <= 0x81FFFFFF:
        raise argparse.ArgumentTypeError("a persistent handle is 0x81000000..0x81FFFFFF")
    return value


def _session_key(args: argparse.Namespace) -> Any:
    """The session's key in the TPM, or a refusal naming what could not be reached."""
    from sandboxsec_client import TpmSessionKey

    from sandboxsec.gateway.errors import GatewaySessionKeyUnavailableError

    if args.session_key_handle is None and args.session_key_context is None:
        raise InputError("name the session's TPM-held key: --session-key-handle or "
                         "--session-key-context")
    try:
        context = (args.session_key_context.read_bytes()
                   if args.session_key_context is not None else None)
        return TpmSessionKey.open(args.tpm_tcti, handle=args.session_key_handle,
                                  context=context)
    except Exception as exc:  # the TSS raises its own errors; the message names none of ours
        raise GatewaySessionKeyUnavailableError(
            f"the session key is not reachable at {args.tpm_tcti} ({type(exc).__name__})"
        ) from None


def _run(args: argparse.Namespace) -> int:
    # Imported here: the MCP SDK takes seconds to import, and every other command would pay.
    import anyio
    from mcp import StdioServerParameters

    from sandboxsec.gateway.mapping import load_mapping
    from sandboxsec.gateway.proxy import Gateway, GatewayConfig
    from sandboxsec.gateway.stdio import strict_stdio_server
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
    session_key = _session_key(args)
    config = GatewayConfig(service_url=args.service, agent_key=key, session_id=args.session,
                           approval_wait=args.approval_wait, record=args.record,
                           session_key=session_key)
    # The tool server inherits the environment, less ours: the agent key never reaches it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    upstream = StdioServerParameters(command=command[0], args=command[1:], env=env)

    async def serve() -> None:
        async with Gateway(upstream, mapping, config) as gateway, \
                strict_stdio_server() as (read, write):
            await gateway.server.run(read, write,
                                     gateway.server.create_initialization_options())

    try:
        anyio.run(serve)
    finally:
        session_key.close()
    return 0
