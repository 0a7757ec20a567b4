"""Attestation verification throughput, measured in one run.

Prints:

1. raw ECDSA P-256 verifications/s (pyca ``verify`` of a quote-sized message), the primitive;
2. in-process full verifications/s: a distinct signed quote per iteration, AK parse, EK chain
   (cached), a 60-event log parsed and replayed, a manifest (cached), every check of the
   verifier; once with the log memoised (a fleet booting one image sends the same bytes) and
   once with a distinct log per iteration (parse and replay every time); and the ratios to
   the raw rate (aim: at least 40 %);
3. the bare-framework floor: a FastAPI app with one sync and one async route
   (``bench/floor_app.py``) on uvicorn with the same worker count, driven by the same
   clients, two requests per "pair" (the second with a verify-sized body);
4. over HTTP against the shipped service (``sandboxsec serve``, SQLite, and with
   ``--postgres`` a throwaway PostgreSQL cluster with fsync on): challenge+verify pairs/s,
   p50/p99 pair latency, server CPU per pair (workers, plus PostgreSQL's backends), and the
   ratio to each floor (aim: 1,000 pairs/s with 2 workers).

Every figure is printed with the load average: on a shared machine the ratio to the floor and
the CPU per pair are the figures that mean something.  The clients are plain keep-alive
HTTP/1.1 in ``--client-procs`` processes, so they take little of the CPU they measure.

Usage: ``python bench/attestation.py [--seconds S] [--clients N] [--client-procs P]
[--workers W] [--no-http] [--no-in-process] [--postgres]``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sandboxsec.attestation import quote as quotes
from sandboxsec.attestation.eventlog import EventLogBuilder
from sandboxsec.attestation.image import ManifestVerifier
from sandboxsec.attestation.verifier import (
    Binding,
    Evidence,
    NonceState,
    VerifierContext,
    verify_evidence,
)
from sandboxsec.attestation.x509chain import TCG_EK_CERTIFICATE, verify_chain
from tests.support.pki import make_ca, make_leaf, make_publisher
from tests.support.softtpm import (
    SoftAk,
    make_manifest,
    marshal_quote,
    sign_quote,
    soft_activate,
)

EVENTS = 60


def _boot(variant: int = 0) -> tuple[bytes, dict[int, bytes]]:
    """A 60-event boot log and its PCRs.  Variants differ in event data bytes but not in
    digests (replay is by digest), so their logs are distinct yet replay to the same PCRs."""
    import hashlib

    builder = EventLogBuilder(("sha256",))
    pcrs = {i: bytes(32) for i in range(8)}
    for n in range(EVENTS):
        d = hashlib.sha256(f"component {n}".encode()).digest()
        builder.add(n % 8, 0x80000001 + n % 6, f"component {n} #{variant}".encode(),
                    digests={"sha256": d})
        pcrs[n % 8] = hashlib.sha256(pcrs[n % 8] + d).digest()
    return builder.to_bytes(), pcrs


def _rate(fn: Any, seconds: float) -> float:
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def bench_in_process(seconds: float) -> None:
    now = datetime.now(UTC)
    ak = SoftAk()
    publisher = make_publisher(not_before=now - timedelta(days=1),
                               not_after=now + timedelta(days=30))
    log, pcrs = _boot()
    manifest = make_manifest(publisher, pcrs)
    manifests = ManifestVerifier(publisher.trust())
    manufacturer = make_ca("Bench TPM CA")
    ek_key = rsa.generate_private_key(65537, 2048)
    ek = make_leaf(manufacturer, "Bench EK", key=ek_key, key_usage=("key_encipherment",),
                   eku=(TCG_EK_CERTIFICATE,))
    ek_cache: dict[bytes, Any] = {}

    def ek_chain() -> None:
        # What the service does: a dict hit by digest, re-verified only outside its window.
        hit = ek_cache.get(ek.der)
        if hit is None or not hit.valid_from <= now < hit.valid_until:
            ek_cache[ek.der] = verify_chain(ek.der, [], [manufacturer.cert], now,
                                            required_key_usage=(),
                                            required_eku=TCG_EK_CERTIFICATE)

    # A pool of distinct quotes (fresh nonces), signed up front: verification is measured.
    pool = []
    for i in range(2000):
        nonce = os.urandom(32)
        q = marshal_quote(nonce, {"sha256": pcrs}, clock=1000 + i)
        pool.append((nonce, q, sign_quote(ak, q)))
    # More distinct logs than the replay memo holds, so every replay is computed.
    distinct_logs = [_boot(i + 1)[0] for i in range(2000)]
    binding = Binding(ak_name=ak.name, ek_fingerprint="")
    msg = pool[0][1]
    sig_der = ak.key.sign(msg, ec.ECDSA(quotes._CRYPTO_HASHES["sha256"]))
    public = ak.key.public_key()
    raw = _rate(lambda: public.verify(sig_der, msg, ec.ECDSA(quotes._CRYPTO_HASHES["sha256"])),
                seconds)

    state = {"i": 0}

    def full(distinct: bool) -> None:
        i = state["i"] = state["i"] + 1
        nonce, q, sig = pool[i % len(pool)]
        event_log = distinct_logs[i % len(distinct_logs)] if distinct else log
        ek_chain()
        verified = manifests.verify(manifest, now)
        result = verify_evidence(
            Evidence(nonce=nonce, quote=q, signature=sig, ak_public=ak.public,
                     pcrs={"sha256": pcrs}, image_manifest=manifest, event_log=event_log),
            VerifierContext(tenant_id="tn_bench", now=now, nonce_state=NonceState.FRESH,
                            binding=binding, manifest=verified),
        )
        assert result.affirming, result.failures

    full(False)
    cached = _rate(lambda: full(False), seconds)
    uncached = _rate(lambda: full(True), seconds)
    print(f"raw ECDSA P-256 verify            {raw:10.0f} /s")
    print(f"full verification, log memoised   {cached:10.0f} /s   ratio {cached / raw:6.1%}")
    print(f"full verification, distinct logs  {uncached:10.0f} /s   ratio {uncached / raw:6.1%}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:4.1f}/{five:4.1f} on {os.cpu_count()} cores"


def _tree_cpu(root_pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by these processes and all their descendants
    (the server's supervisor and workers; PostgreSQL's postmaster and backends)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()
        parent[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    wanted = set(root_pids)
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in wanted and pid not in wanted}
        wanted |= more
        grew = bool(more)
    return sum(ticks.get(pid, 0) for pid in wanted) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> set[int]:
    """The direct children of ``pid`` (uvicorn's workers)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _is_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _wait_workers_ready(pid: int, workers: int, timeout: float = 120.0) -> None:
    """Wait until ``workers`` workers exist and all are idle (done importing and building the
    app): on a loaded machine a worker can take many seconds to start, and a run that begins
    earlier measures one worker, not ``workers``."""
    deadline = time.monotonic() + timeout
    quiet = 0
    last: float | None = None
    while time.monotonic() < deadline:
        kids = {k for k in _children(pid) if _is_worker(k)}
        used = _tree_cpu(list(kids)) if len(kids) >= workers else None
        quiet = quiet + 1 if used is not None and last is not None and used - last < 0.02 else 0
        if quiet >= 4:
            return
        last = used
        time.sleep(0.25)


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)


def _wait_healthy(port: int, path: str = "/healthz") -> None:
    import http.client

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on port {port} did not start")


class _Result:
    def __init__(self, label: str, pairs: float, p50: float, p99: float, cpu_ms: float,
                 load: str, failures: int, first_failure: str) -> None:
        self.label, self.pairs, self.p50, self.p99 = label, pairs, p50, p99
        self.cpu_ms, self.load = cpu_ms, load
        self.failures, self.first_failure = failures, first_failure


def _drive(port: int, make_client: Any, clients: int, procs: int, seconds: float,
           server_pids: list[int], label: str) -> _Result:
    """Run ``clients`` client loops (threads spread over ``procs`` processes, plain keep-alive
    HTTP/1.1 so the client costs little) for ``seconds``; each loop iteration is one pair."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue: Any = ctx.Queue()
    start_at = time.time() + 1.0
    stop_at = start_at + seconds

    def proc_main(indexes: list[int]) -> None:
        out: list[tuple[list[float], list[str]]] = []
        lock = threading.Lock()

        def run(index: int) -> None:
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            one = make_client(index, conn)
            lat: list[float] = []
            fails: list[str] = []
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < stop_at:
                t0 = time.perf_counter()
                problem = one()
                lat.append(time.perf_counter() - t0)
                if problem:
                    fails.append(problem)
            with lock:
                out.append((lat, fails))

        threads = [threading.Thread(target=run, args=(i,)) for i in indexes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        queue.put(out)

    groups = [list(range(clients))[i::procs] for i in range(procs)]
    children = [ctx.Process(target=proc_main, args=(g,)) for g in groups if g]
    for c in children:
        c.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = _tree_cpu(server_pids)
    results = [queue.get() for _ in children]
    cpu1 = _tree_cpu(server_pids)
    load = _load()
    for c in children:
        c.join()
    lat = sorted(x for r in results for lats, _ in r for x in lats)
    fails = [f for r in results for _, fs in r for f in fs]
    done = len(lat)
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
    return _Result(label, done / seconds, p50, p99, (cpu1 - cpu0) * 1000 / max(1, done), load,
                   len(fails), fails[0] if fails else "")


def _post(conn: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def _verify_body(ak: SoftAk, nonce_b64: str, tick: int, pcrs: dict[int, bytes],
                 log_b64: str, manifest: str) -> bytes:
    q = marshal_quote(base64.b64decode(nonce_b64), {"sha256": pcrs}, clock=tick)
    return json.dumps({
        "nonce": nonce_b64, "quote": base64.b64encode(q).decode(),
        "signature": base64.b64encode(sign_quote(ak, q)).decode(),
        "ak_public": base64.b64encode(ak.public).decode(),
        "pcrs": {"sha256": {str(i): v.hex() for i, v in pcrs.items()}},
        "event_log": log_b64, "image_manifest": manifest,
    }).encode()


def bench_floor(seconds: float, clients: int, procs: int, workers: int,
                sample_body: bytes) -> dict[str, _Result]:
    """The bare FastAPI app (bench/floor_app.py) on uvicorn with the server's settings; a
    "pair" is two POSTs, the second with a body the size of a verify request."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "floor_app:app", "--app-dir",
         str(Path(__file__).parent), "--port", str(port), "--workers", str(workers),
         "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    try:
        _wait_healthy(port, "/docs")
        _wait_workers_ready(server.pid, workers)
        for route in ("sync", "async"):
            def make(_index: int, conn: Any, path: str = f"/{route}") -> Any:
                def one() -> str:
                    status, _ = _post(conn, path, b'{"nonce": ""}', {})
                    status2, _ = _post(conn, path, sample_body, {})
                    return "" if status == status2 == 200 else f"status {status}/{status2}"
                return one
            out[route] = _drive(port, make, clients, procs, seconds, [server.pid],
                                f"floor: bare FastAPI, {route} route")
    finally:
        _stop(server)
    return out


def bench_http(seconds: float, clients: int, procs: int, workers: int,
               postgres: bool) -> _Result:
    from sandboxsec.services import Services
    from sandboxsec.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="sandboxsec-bench-"))
    cluster = None
    database_url = None
    pg_pids: list[int] = []
    if postgres:
        from tests.support.pgcluster import PgCluster

        # The shipped configuration: a durable cluster (tests run theirs with fsync off).
        cluster = PgCluster(fsync=True)
        database_url = cluster.start()
        pg_pids = [int((cluster.data / "postmaster.pid").read_text().split()[0])]
    try:
        # 1. Trust: a publisher and a TPM manufacturer, written where the service reads them.
        from tests.support.faults import make_trust

        trust = make_trust(home)
        publisher, ek_key, ek = trust.publisher, trust.ek_key, trust.ek
        env = {**os.environ, "SANDBOXSEC_HOME": str(home), "SANDBOXSEC_LOG_LEVEL": "warning"}
        env.pop("SANDBOXSEC_DATABASE_URL", None)
        if database_url:
            env["SANDBOXSEC_DATABASE_URL"] = database_url
        # 2. A tenant (the service's own code path, same home and database).
        services = Services(Settings(home=home, database_url=database_url))
        from tests.support.benchconfig import describe

        print("  " + describe(services.settings, database="PostgreSQL 15, fsync on" if postgres
                              else "SQLite WAL, synchronous=NORMAL (shipped)"))
        services.db.migrate()
        created = services.tenants.create("bench")
        agent = created.keys[next(r for r in created.keys if str(r) == "agent")].key
        services.close()
        # 3. The server, as shipped (`sandboxsec serve`).
        port = _free_port()
        exe = shutil.which("sandboxsec", path=str(Path(sys.executable).parent)) or "sandboxsec"
        server = subprocess.Popen(
            [exe, "serve", "--port", str(port), "--workers", str(workers)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(port)
            _wait_workers_ready(server.pid, workers)
            headers = {"Authorization": f"Bearer {agent}"}
            log, pcrs = _boot()
            manifest = make_manifest(publisher, pcrs).decode()
            log_b64 = base64.b64encode(log).decode()
            # One AK per client (one sandbox each), bound by the MakeCredential round: quotes
            # of one AK must arrive in clock order or they are (rightly) refused as stale.
            import http.client

            aks = [SoftAk() for _ in range(clients)]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for ak in aks:
                _, raw = _post(conn, "/v1/attestation/ak/challenge", json.dumps({
                    "ak_public": base64.b64encode(ak.public).decode(),
                    "ek_certificate": base64.b64encode(ek.der).decode(),
                }).encode(), headers)
                ch = json.loads(raw)
                secret = soft_activate(ek_key, ak.name,
                                       base64.b64decode(ch["credential_blob"]),
                                       base64.b64decode(ch["encrypted_secret"]))
                status, raw = _post(conn, "/v1/attestation/ak/activate", json.dumps({
                    "credential_id": ch["credential_id"],
                    "secret": base64.b64encode(secret).decode()}).encode(), headers)
                assert status == 200, raw
            conn.close()

            def make(index: int, conn: Any) -> Any:
                ak = aks[index]
                tick = [10_000]

                def one() -> str:
                    status, raw = _post(conn, "/v1/attestation/challenge", b"{}", headers)
                    if status != 200:
                        return f"challenge {status}"
                    tick[0] += 1
                    body = _verify_body(ak, json.loads(raw)["nonce"], tick[0], pcrs, log_b64,
                                        manifest)
                    status, raw = _post(conn, "/v1/attestation/verify", body, headers)
                    out = json.loads(raw)
                    return "" if out.get("status") == "affirming" else str(out)[:200]
                return one

            backend = "PostgreSQL, fsync on" if postgres else "SQLite"
            workers_before = _children(server.pid)
            result = _drive(port, make, clients, procs, seconds, [server.pid, *pg_pids],
                            f"HTTP challenge+verify, {backend}")
            restarted = len(workers_before - _children(server.pid))
            if restarted:
                # uvicorn's supervisor kills a worker that misses its 5 s health check; on an
                # overloaded machine that happens, and the figure above includes the restart.
                result.first_failure += f"  [{restarted} worker(s) restarted during the run]"
                result.failures += 1
            return result
        finally:
            _stop(server)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if cluster is not None:
            cluster.stop()


def _print(r: _Result, floors: dict[str, _Result] | None, workers: int, clients: int) -> None:
    line = (f"{r.label} ({workers} workers, {clients} clients): {r.pairs:8.0f} pairs/s   "
            f"p50 {r.p50:6.1f} ms   p99 {r.p99:6.1f} ms   server CPU {r.cpu_ms:5.2f} ms/pair"
            f"   [{r.load}]")
    print(line)
    if floors:
        print("    against the floor measured in this run: "
              + ", ".join(f"{r.pairs / f.pairs:6.1%} of the {k} floor"
                          for k, f in floors.items() if f.pairs))
    if r.failures:
        print(f"    unexpected answers: {r.failures} (first: {r.first_failure})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-procs", type=int, default=2,
                        help="client processes the client threads are spread over")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--no-in-process", action="store_true")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare-framework floor")
    parser.add_argument("--postgres", action="store_true",
                        help="also run the HTTP part on a throwaway PostgreSQL cluster "
                        "(fsync on)")
    args = parser.parse_args()
    print(f"shipped configuration: default caches, no gc.freeze; SQLite synchronous=NORMAL "
          f"(WAL); PostgreSQL fsync on.  [{_load()}]")
    if not args.no_in_process:
        bench_in_process(args.seconds)
    if not args.no_http:
        log, pcrs = _boot()
        sample = _verify_body(SoftAk(), base64.b64encode(bytes(32)).decode(), 1, pcrs,
                              base64.b64encode(log).decode(), "{}")
        floors = {} if args.no_floor else bench_floor(
            args.seconds, args.clients, args.client_procs, args.workers, sample)
        for f in floors.values():
            _print(f, None, args.workers, args.clients)
        runs = [False, True] if args.postgres else [False]
        for pg in runs:
            r = bench_http(args.seconds, args.clients, args.client_procs, args.workers, pg)
            _print(r, floors, args.workers, args.clients)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
