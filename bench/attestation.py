"""Attestation verification throughput, measured in one run.

Prints:

1. raw ECDSA P-256 verifications/s (pyca ``verify`` of a quote-sized message), the primitive;
2. in-process full verifications/s: a distinct signed quote per iteration, AK parse, EK chain
   (cached), a 60-event log parsed and replayed, a manifest (cached), every check of the
   verifier; once with the log memoised (a fleet booting one image sends the same bytes) and
   once with a distinct log per iteration (parse and replay every time); and the ratios to
   the raw rate (aim: at least 40 %);
3. over HTTP against a running service (``sandboxsec serve``, SQLite, in a temp home):
   challenge+verify pairs/s and p50/p99 pair latency with concurrent clients (aim: 500/s).

Usage: ``python bench/attestation.py [--seconds S] [--clients N] [--workers W] [--no-http]
[--postgres]`` (``--postgres`` repeats the HTTP part on a throwaway PostgreSQL cluster).
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


def bench_http(seconds: float, clients: int, workers: int, postgres: bool) -> None:
    import httpx

    from sandboxsec.services import Services
    from sandboxsec.settings import Settings

    home = Path(tempfile.mkdtemp(prefix="sandboxsec-bench-"))
    cluster = None
    database_url = None
    if postgres:
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster(fsync=True)  # a bench measures a durable server
        database_url = cluster.start()
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
        # 3. The server.
        port = _free_port()
        exe = shutil.which("sandboxsec", path=str(Path(sys.executable).parent)) or "sandboxsec"
        server = subprocess.Popen(
            [exe, "serve", "--port", str(port), "--workers", str(workers)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/healthz", timeout=0.5).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            headers = {"Authorization": f"Bearer {agent}"}
            log, pcrs = _boot()
            manifest = make_manifest(publisher, pcrs).decode()
            # One AK per client (one sandbox each), bound by the MakeCredential round: quotes
            # of one AK must arrive in clock order or they are (rightly) refused as stale.
            aks = [SoftAk() for _ in range(clients)]
            with httpx.Client(base_url=base, headers=headers, timeout=10) as c:
                for ak in aks:
                    ch = c.post("/v1/attestation/ak/challenge", json={
                        "ak_public": base64.b64encode(ak.public).decode(),
                        "ek_certificate": base64.b64encode(ek.der).decode(),
                    }).json()
                    secret = soft_activate(ek_key, ak.name,
                                           base64.b64decode(ch["credential_blob"]),
                                           base64.b64decode(ch["encrypted_secret"]))
                    r = c.post("/v1/attestation/ak/activate", json={
                        "credential_id": ch["credential_id"],
                        "secret": base64.b64encode(secret).decode()})
                    assert r.status_code == 200, r.text
            _run_clients(base, headers, aks, log, pcrs, manifest, seconds, workers,
                         "PostgreSQL" if postgres else "SQLite")
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        if cluster is not None:
            cluster.stop()


def _run_clients(base: str, headers: dict[str, str], aks: list[SoftAk], log: bytes,
                 pcrs: dict[int, bytes], manifest: str, seconds: float, workers: int,
                 backend: str) -> None:
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    log_b64 = base64.b64encode(log).decode()
    pcr_hex = {"sha256": {str(i): v.hex() for i, v in pcrs.items()}}
    stop = time.monotonic() + seconds

    def client(ak: SoftAk) -> None:
        mine: list[float] = []
        ak_b64 = base64.b64encode(ak.public).decode()
        tick = 10_000
        with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                nonce_b64 = c.post("/v1/attestation/challenge", json={}).json()["nonce"]
                tick += 1
                q = marshal_quote(base64.b64decode(nonce_b64), {"sha256": pcrs}, clock=tick)
                body: dict[str, Any] = {
                    "nonce": nonce_b64, "quote": base64.b64encode(q).decode(),
                    "signature": base64.b64encode(sign_quote(ak, q)).decode(),
                    "ak_public": ak_b64, "pcrs": pcr_hex, "event_log": log_b64,
                    "image_manifest": manifest,
                }
                out = c.post("/v1/attestation/verify", content=json.dumps(body),
                             headers={"content-type": "application/json"}).json()
                mine.append(time.perf_counter() - t0)
                if out.get("status") != "affirming":
                    with lock:
                        failures.append(str(out)[:200])
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(ak,)) for ak in aks]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    lat = sorted(latencies)
    p50 = statistics.median(lat) * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    print(f"HTTP challenge+verify ({workers} worker(s), {len(aks)} clients, {backend}): "
          f"{len(lat) / elapsed:8.0f} pairs/s   p50 {p50:6.1f} ms   p99 {p99:6.1f} ms")
    if failures:
        print(f"  non-affirming answers: {len(failures)} (first: {failures[0]})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--postgres", action="store_true",
                        help="also run the HTTP part on a throwaway PostgreSQL cluster")
    args = parser.parse_args()
    bench_in_process(args.seconds)
    if not args.no_http:
        bench_http(args.seconds, args.clients, args.workers, postgres=False)
        if args.postgres:
            bench_http(args.seconds, args.clients, args.workers, postgres=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
