"""One tenant's audited appends on one node and on two nodes sharing one PostgreSQL (fsync on).

A node is a separate process holding its own ``Services`` (what a ``sandboxsec serve`` worker
holds) on the shared database.  Each node runs ``--threads`` callers; each caller loops over
the audited write every domain service makes: a transaction that records one audit record with
``append(record, session=s)`` and commits.  All records go to ONE tenant's log.

Measured in one run, on a throwaway PostgreSQL 15 cluster with ``fsync=on`` and
``synchronous_commit=on`` (the shipped configuration; the test cluster runs with fsync off):

1. the floor: commits/s of a bare one-row INSERT transaction, one connection and as many
   connections as the nodes' callers (PostgreSQL's own group commit), so the audit figures
   read against the database's commit latency on this machine;
2. deferred sequencing (the default on PostgreSQL): one node, then two nodes; the ratio;
3. the former design (``SANDBOXSEC_AUDIT_DEFERRED_SEQUENCING=false``: the caller's
   transaction locks the tenant's head row until it commits), one node then two, for contrast.

Load averages are printed with each figure: the machine may be shared, and when the CPU is
the limit two nodes on it cannot add capacity (the ratio then reads against the CPU, not the
design).  Run: ``python bench/audit_nodes.py [--seconds 10] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.support.pgcluster import PgCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TENANT = "tn_bench_nodes"


def _record(i: int) -> object:
    from sandboxsec.audit.events import AuditEvent
    from sandboxsec.audit.record import AuditRecord

    return AuditRecord(
        event=AuditEvent.POLICY_DECISION, tenant_id=TENANT, actor_key_id="ak_bench",
        actor_role="agent", outcome="allow", reason="rule_allow_small",
        object_ids={"session_id": f"ss_{i}"}, body={"i": i, "action": "payment", "amount": 12},
        sensitive={"card": "4111111111111111"},
    )


def _node(url: str, home: str, deferred: bool, threads: int, go: Any,
          seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    from sandboxsec.services import Services
    from sandboxsec.settings import Settings

    svc = Services(Settings(home=Path(home), database_url=url, log_level="warning",
                            audit_deferred_sequencing=deferred))
    counts = [0] * threads
    errors: list[str] = []
    svc.audit.append(_record(-1))  # warm: keys, head row, connections
    out.put("ready")
    go.wait()
    start_at = time.time()

    def caller(t: int) -> None:
        end = start_at + seconds
        n = 0
        while time.time() < end:
            try:
                with svc.db.session() as s:
                    svc.audit.append(_record(t * 10_000_000 + n),  # type: ignore[arg-type]
                                     session=s)
            except Exception as exc:  # counted as not done, and said once
                errors.append(type(exc).__name__ + ": " + str(exc)[:200])
                continue
            n += 1
        counts[t] = n

    ts = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    svc.close()
    if errors:
        print(f"node {os.getpid()}: {len(errors)} failed appends, first: {errors[0]}",
              file=sys.stderr)
    out.put(sum(counts))


def run_nodes(url: str, home: str, nodes: int, deferred: bool, threads: int,
              seconds: float) -> tuple[float, tuple[float, float, float]]:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    procs = [ctx.Process(target=_node, args=(url, home, deferred, threads, go, seconds,
                                               out)) for _ in range(nodes)]
    for p in procs:
        p.start()
    # Every node started (imports, keys, connections) before the clock runs.
    for _ in procs:
        assert out.get(timeout=300) == "ready"
    go.set()
    total = sum(out.get(timeout=seconds + 120) for _ in procs)
    load = os.getloadavg()
    for p in procs:
        p.join(timeout=30)
    return total / seconds, load


def commit_floor(url: str, connections: int, seconds: float) -> float:
    from sqlalchemy import create_engine, text

    eng = create_engine(url, pool_size=connections + 2)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS bench_floor (id bigserial primary key, "
                       "v text)"))
    counts = [0] * connections
    end = time.time() + seconds

    def loop(t: int) -> None:
        n = 0
        while time.time() < end:
            with eng.begin() as c:
                c.execute(text("INSERT INTO bench_floor (v) VALUES ('x')"))
            n += 1
        counts[t] = n

    ts = [threading.Thread(target=loop, args=(t,)) for t in range(connections)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    eng.dispose()
    return sum(counts) / seconds


def main() -> None:
    from sqlalchemy import create_engine, text

    from sandboxsec.services import Services
    from sandboxsec.settings import Settings
    from tests.support.pgcluster import PgCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=8, help="callers per node")
    args = parser.parse_args()

    cluster = PgCluster()
    base = cluster.start()
    home = Path(tempfile.mkdtemp(prefix="sandboxsec-bench-nodes-"))
    try:
        # The shipped configuration: durable commits.  fsync is a reload-level setting, and
        # ALTER SYSTEM does not beat the test cluster's command line, so restart without it.
        _restart_durable(cluster)
        eng = create_engine(base, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            fsync = c.execute(text("SHOW fsync")).scalar_one()
            sync = c.execute(text("SHOW synchronous_commit")).scalar_one()
        eng.dispose()
        print(f"PostgreSQL 15, fsync={fsync}, synchronous_commit={sync}; "
              f"{os.cpu_count()} CPUs; load before {_load()}")
        urls, homes = {}, {}
        for name in ("deferred", "direct"):
            url = cluster.create_database(f"bench_{name}")
            # One home per database: a home's signed-state files belong to one set of logs.
            homes[name] = home / name
            homes[name].mkdir(mode=0o700)
            svc = Services(Settings(home=homes[name], database_url=url))
            svc.db.migrate()
            svc.close()
            svc.db.dispose()
            urls[name] = url
        nthreads = args.threads
        f1 = commit_floor(urls["direct"], 1, min(args.seconds, 5))
        fn = commit_floor(urls["direct"], 2 * nthreads, min(args.seconds, 5))
        print(f"floor: bare INSERT+COMMIT {f1:,.0f}/s on 1 connection "
              f"({1000 / f1:.2f} ms/commit), {fn:,.0f}/s on {2 * nthreads} connections")
        results: dict[tuple[str, int], float] = {}
        # Each node also appends one warm-up record; the log must hold every acknowledged one.
        for name, deferred in (("deferred", True), ("direct", False)):
            for nodes in (1, 2):
                rate, load = run_nodes(urls[name], str(homes[name]), nodes, deferred, nthreads,
                                       args.seconds)
                results[(name, nodes)] = rate
                print(f"{name:>8} sequencing, {nodes} node(s) x {nthreads} callers, one tenant: "
                      f"{rate:,.0f} audited appends/s  (load {load[0]:.2f})")
            _check_log(urls[name], homes[name])
            ratio = results[(name, 2)] / results[(name, 1)]
            print(f"{name:>8}: two nodes / one node = {ratio:.2f}x")
        print(f"deferred two nodes vs former one node: "
              f"{results[('deferred', 2)] / results[('direct', 1)]:.2f}x; "
              f"deferred one node vs floor on {2 * nthreads} connections: "
              f"{results[('deferred', 1)] / fn:.2f}")
        print(f"load after {_load()}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
        cluster.stop()


def _check_log(url: str, home: Path) -> None:
    """Every acknowledged append is in the log, nothing is left pending, the export verifies."""
    from sqlalchemy import text

    from sandboxsec.audit.verify import verify_export
    from sandboxsec.services import Services
    from sandboxsec.settings import Settings

    svc = Services(Settings(home=home, database_url=url, log_level="warning"))
    try:
        data = b"".join(svc.audit.export(TENANT))
        report = verify_export(data, svc.audit.keys.public_key, expected_log=TENANT)
        with svc.db.engine.connect() as c:
            pending = c.execute(text("SELECT count(*) FROM audit_pending")).scalar_one()
        print(f"          log of {report.entries:,} entries verifies; {pending} intents left")
    finally:
        svc.close()
        svc.db.dispose()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _restart_durable(cluster: PgCluster) -> None:
    """Restart ``cluster`` on the same data directory and port with durable settings."""
    import subprocess

    from tests.support.pgcluster import PG_BIN

    run_as, data, root, port = cluster._as, cluster.data, cluster.root, cluster.port
    subprocess.run([*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "stop", "-m", "fast"],
                   check=True, stdout=subprocess.DEVNULL, cwd=root)
    opts = (f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=on "
            "-c synchronous_commit=on -c full_page_writes=on -c max_connections=300 "
            "-c shared_buffers=128MB")
    subprocess.run([*run_as, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l",
                    str(Path(root) / "log"), "-w", "-t", "60", "start"],
                   check=True, stdout=subprocess.DEVNULL, cwd=root)


if __name__ == "__main__":
    main()
