"""Latency the MCP gateway adds to an allowed tool call, measured in one run.

Starts ``sandboxsec serve`` (SQLite, temp home, one worker), attests a software-TPM sandbox,
allows the read-only tool by policy, and times N sequential calls of ``get_balance`` on the
test tool server (stdio) three ways:

1. direct: the MCP client talks to the tool server (the primitive);
2. through ``sandboxsec gateway`` started as a stdio subprocess, exactly as a runtime would,
   signing each proof with a session key held in a software TPM (swtpm);
3. the service's own decision alone (``POST /v1/actions`` through the client, its proof
   signed by a software key), which the gateway must wait for on every call.

(2b: the same gateway in process with a software session key, to separate the extra stdio
hop and the TPM's signature from its work; 4: one ``TPM2_Sign`` by the session key, measured
before the gateway takes the TPM over; 5: a bare MCP proxy on stdio built on the same SDK
(``bench/mcp_passthrough.py``: it forwards each call as it came and decides nothing), the
floor that one more stdio hop sets for any proxy in the gateway's place.)  Prints medians and
p90s, the added latency (2 - 1) split into the decision (3), the stdio hop and TPM signature
(2 - 2b) and the gateway's own work (2b - 1 - 3), and the bare proxy's share (5 - 1).  Aim:
under 2 ms median added per allowed call.

Usage: ``python bench/gateway.py [--calls N]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import anyio
from mcp import Client, StdioServerParameters
from sandboxsec_client import AdminClient, AgentClient, AsyncAgentClient, TpmSessionKey

from sandboxsec.gateway.mapping import load_mapping
from sandboxsec.gateway.proxy import Gateway, GatewayConfig
from sandboxsec.logging import configure_logging
from sandboxsec.sandbox import swtpm as sw
from tests.integration.clients.conftest import Live, SoftSandbox, SwtpmKeySandbox
from tests.support.faults import CLI, Deployment, running
from tests.support.sessionkeys import KEYS

ROOT = Path(__file__).resolve().parents[1]
TOOL_SERVER = ROOT / "tests" / "integration" / "clients" / "tool_server.py"
PASSTHROUGH = ROOT / "bench" / "mcp_passthrough.py"
MAPPING = """server = "payments"
[tools.get_balance]
action = "read"
resource = "account:{account}"
"""


async def _rounds(n: int, ways: dict[str, Callable[[], Awaitable[object]]]
                  ) -> dict[str, list[float]]:
    for call in ways.values():  # warm up: imports, connections, caches
        for _ in range(min(20, n)):
            await call()
    out: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(n):
        for name, call in ways.items():
            t0 = time.perf_counter()
            await call()
            out[name].append((time.perf_counter() - t0) * 1000)
    return out


def _stats(name: str, ms: list[float]) -> float:
    med = statistics.median(ms)
    p90 = statistics.quantiles(ms, n=10)[-1]
    print(f"  {name:<44} median {med:7.3f} ms   p90 {p90:7.3f} ms")
    return med


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandboxsec-bench-gw-") as tmp:
        deployment = Deployment(Path(tmp) / "home")
        tenant, other = deployment.create_tenants("bench-gw", "bench-other")
        with running(deployment, workers=1) as server:
            live = Live(server.base, deployment, server, tenant, other,
                        SoftSandbox(deployment.trust))
            with AgentClient(live.base, live.key("agent")) as agent:
                agent.bind_ak(live.sandbox)
            sid = live.new_session()  # a software session key: 2b and 3
            (Path(tmp) / "swtpm").mkdir()
            device = sw.start_swtpm(Path(tmp) / "swtpm")
            tpm_sid = live.new_session(SwtpmKeySandbox(live.sandbox, device))
            assert device.session_key_handle is not None
            signer = TpmSessionKey.of(device.esapi, device.session_key_handle)
            signs = []
            for i in range(min(args.calls, 200)):
                t0 = time.perf_counter()
                signer.sign(b"proof %d" % i)
                signs.append((time.perf_counter() - t0) * 1000)
            device.esapi.close()  # swtpm serves one connection: the gateway's from now on
            tcti = f"swtpm:host=127.0.0.1,port={device.port}"
            with AdminClient(live.base, live.key("admin")) as admin:
                p = admin.policy()
                admin.replace_policy(p.text + "\np, mcp-read, read, *, attested == true, "
                                     "allow\n", base_version=p.version)
            mapping = Path(tmp) / "payments.toml"
            mapping.write_text(MAPPING)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
            env["TOOL_LOG"] = str(Path(tmp) / "calls.jsonl")
            direct = StdioServerParameters(command=sys.executable, args=[str(TOOL_SERVER)],
                                           env=env)
            gateway = StdioServerParameters(
                command=CLI[0], args=[*CLI[1:], "gateway", "--service", live.base, "--session",
                                      tpm_sid, "--tpm-tcti", tcti, "--session-key-handle",
                                      hex(SwtpmKeySandbox.HANDLE), "--mapping", str(mapping),
                                      "--", sys.executable, str(TOOL_SERVER)],
                env={**env, "SANDBOXSEC_AGENT_KEY": live.key("agent"),
                     "SANDBOXSEC_LOG_LEVEL": "warning", "SANDBOXSEC_HOME": str(tmp)})
            bare = StdioServerParameters(
                command=sys.executable, args=[str(PASSTHROUGH), "--", sys.executable,
                                              str(TOOL_SERVER)], env=env)
            arguments = {"account": "main"}

            config = GatewayConfig(live.base, live.key("agent"), sid, session_key=KEYS[sid])

            async def run() -> dict[str, list[float]]:
                # All four clients open at once and timed round-robin, call by call: on a
                # shared machine the load drifts, and differences within one round do not.
                async with Client(direct) as c, Client(gateway) as g, Client(bare) as b, \
                        Gateway(direct, load_mapping(mapping), config) as gw, \
                        Client(gw.server) as gi, \
                        AsyncAgentClient(live.base, live.key("agent"), session_key=KEYS[sid],
                                         session_id=sid) as a:
                    r = await g.call_tool("get_balance", arguments)
                    assert not r.is_error, r
                    ways: dict[str, Callable[[], Awaitable[object]]] = {
                        "direct": lambda: c.call_tool("get_balance", arguments),
                        "via": lambda: g.call_tool("get_balance", arguments),
                        "inproc": lambda: gi.call_tool("get_balance", arguments),
                        "ask": lambda: a.ask(sid, "read", "account:main", {"account": "main"}),
                        "bare": lambda: b.call_tool("get_balance", arguments),
                    }
                    return await _rounds(args.calls, ways)

            configure_logging("warning", stream=sys.stderr)
            try:
                t = anyio.run(run)
            finally:
                device.process.terminate()
                device.process.wait(timeout=10)
            d, via, inproc, ask, bare_ms = (t["direct"], t["via"], t["inproc"], t["ask"],
                                            t["bare"])
    print(f"gateway latency, {args.calls} sequential allowed calls (SQLite, 1 worker)")
    direct_med = _stats("1. direct MCP call (stdio)", d)
    via_med = _stats("2. through sandboxsec gateway (stdio, swtpm key)", via)
    _stats("2b. through the gateway in process (soft key)", inproc)
    ask_med = _stats("3. the service's decision alone (soft key)", ask)
    _stats("4. one TPM2_Sign by the session key (swtpm)", signs)
    _stats("5. through a bare MCP proxy (stdio, no decision)", bare_ms)
    added = statistics.median(v - x for v, x in zip(via, d, strict=True))
    hop = statistics.median(v - i for v, i in zip(via, inproc, strict=True))
    own = statistics.median(i - x - q for i, x, q in zip(inproc, d, ask, strict=True))
    # The aim is the whole added latency per allowed call, not the gateway's own share.
    print(f"  per round (medians of differences): added {added:.3f} ms "
          f"({via_med / direct_med:.1f}x direct; aim < 2 ms: "
          f"{'met' if added < 2 else 'NOT met'})")
    print(f"  of which the decision {ask_med:.3f} ms, the extra stdio hop and TPM signature "
          f"{hop:.3f} ms, the gateway's own work {own:.3f} ms")
    floor = statistics.median(x - y for x, y in zip(bare_ms, d, strict=True))
    print(f"  floor: a bare proxy on the same SDK adds {floor:.3f} ms per call with no decision "
          f"and no proof ({floor / 2:.0%} of the 2 ms aim before any gateway work)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
