"""End-to-end load against the service started as a user starts it, then a full check.

For each backend (SQLite file, throwaway PostgreSQL 15 cluster) this script:

1. installs trust roots (an image publisher, a TPM manufacturer) in a temp home, creates
   tenants, and starts ``sandboxsec serve --workers W`` on a free loopback port;
2. measures the raw baseline of that very server: ``GET /healthz`` requests/s with the same
   number of concurrent clients (HTTP, ASGI and one trivial database query: the floor every
   API call stands on);
3. runs simulated agents (httpx async), each binding its AK once and then repeating
   attest -> session -> 20 trajectory records -> actions (an allowed message, a login and a
   payment that need approval, an over-limit payment that is denied) -> grant verification,
   while approver tasks approve or deny the pending requests concurrently;
4. reports sessions/s, records/s, actions/s, p50/p99 per endpoint and error answers by
   status and reason code, with ratios against the baseline;
5. verifies: every acknowledged record reads back (admin) unchanged, every acknowledged
   approval decision and grant use is reflected in the approval's state, no used grant is
   accepted again, and each tenant's audit export passes ``sandboxsec audit verify`` and
   holds an entry for every acknowledged audited operation.

Usage: ``python bench/load.py [--backend sqlite|postgres|both] [--agents N] [--tenants T]
[--approvers A] [--seconds S] [--sessions N] [--workers W]``.  Loopback only; bounded by
``--seconds`` and ``--sessions``.  Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from tests.support.faults import (
    Deployment,
    Ledger,
    LoadConfig,
    check_ledger,
    percentile,
    run_load_async,
    running,
    summary,
)


async def _baseline(base: str, clients: int, seconds: float) -> tuple[float, float, float]:
    """``GET /healthz`` requests/s, p50 and p99 (ms) with ``clients`` concurrent clients."""
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def one() -> None:
        # One client each, as the simulated agents have.
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = await c.get("/healthz")
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()

    start = time.monotonic()
    await asyncio.gather(*[one() for _ in range(clients)])
    elapsed = time.monotonic() - start
    return (len(latencies) / elapsed, statistics.median(latencies) * 1000,
            percentile(latencies, 0.99) * 1000)


def run_backend(backend: str, args: argparse.Namespace) -> bool:
    home = Path(tempfile.mkdtemp(prefix="sandboxsec-load-"))
    cluster = None
    url = None
    if backend == "postgres":
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster(fsync=True)  # a bench measures a durable server
        url = cluster.start()
    try:
        deployment = Deployment(home / "home", url)
        deployment.create_tenants(*[f"load-tenant-{i}" for i in range(args.tenants)])
        with running(deployment, workers=args.workers) as server:
            clients = args.agents + args.approvers * args.tenants
            rate, p50, p99 = asyncio.run(_baseline(server.base, clients, 3.0))
            print(f"== {backend}: {args.workers} workers, {args.tenants} tenants, "
                  f"{args.agents} agents, {args.approvers} approvers per tenant, "
                  f"{args.seconds:.0f} s")
            from sandboxsec.settings import Settings
            from tests.support.benchconfig import describe

            print("  " + describe(Settings(home=deployment.home, database_url=url),
                                  database="PostgreSQL 15, fsync on" if url
                                  else "SQLite WAL, synchronous=NORMAL (shipped)"))
            print(f"  baseline GET /healthz ({clients} clients): {rate:.0f} req/s, "
                  f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            per_tenant = max(1, args.agents // args.tenants)
            cfg = LoadConfig(agents_per_tenant=per_tenant, approvers_per_tenant=args.approvers,
                             seconds=args.seconds, max_sessions=args.sessions,
                             wait_timeout=5.0)
            cpu = time.process_time()
            ledger = asyncio.run(run_load_async(server.base, deployment.tenants,
                                                deployment.trust, cfg, Ledger()))
            print(summary(ledger))
            elapsed = ledger.finished - ledger.started
            # Client and server share the machine: say how much of it the client took.
            print(f"  load generator CPU {(time.process_time() - cpu) / elapsed:.0%} of one core;"
                  f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            calls = sum(len(v) for v in ledger.latencies.values())
            print(f"  all API calls: {calls / elapsed:.0f} req/s = {calls / elapsed / rate:.1%} "
                  f"of the /healthz baseline; records/s = "
                  f"{len(ledger.records) / elapsed / rate:.1%} of it")
            t0 = time.monotonic()
            problems = check_ledger(deployment, server.base, ledger)
            print(f"  verification ({len(ledger.records)} records, {len(ledger.approvals)} "
                  f"approvals, {len(ledger.grants)} grants, {len(deployment.tenants)} audit "
                  f"exports verified offline) took {time.monotonic() - t0:.1f} s: "
                  f"{'OK' if not problems else f'{len(problems)} PROBLEMS'}")
            for p in problems[:20]:
                print(f"    {p}")
            return not problems
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--agents", type=int, default=16, help="concurrent agents in all")
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--approvers", type=int, default=2, help="approvers per tenant")
    parser.add_argument("--seconds", type=float, default=20.0, help="agents start sessions "
                        "for this long")
    parser.add_argument("--sessions", type=int, default=100_000, help="at most this many")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    ok = all([run_backend(b, args) for b in backends])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
