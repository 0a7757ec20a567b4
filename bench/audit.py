"""Audit log throughput and proof sizes, measured in one run beside raw SHA-256.

Prints:

1. raw ``hashlib.sha256`` of 256-byte inputs (hashes/s): the primitive everything else is
   compared with;
2. appends/s on SQLite (WAL) through ``AuditLog``: one caller appending one record at
   a time (one commit each), many concurrent callers (the group-commit writer batches them),
   and ``append_many`` batches of 1,000 (three runs of ``BENCH_AUDIT_APPENDS`` entries, their
   median printed with the lowest and highest); each returns only after its commit.
   Measured three times, each labelled: "durable" with ``synchronous=FULL`` (the WAL fsynced
   at every commit) without witnesses, then with two ``sandboxsec witness serve`` processes
   configured (every checkpoint is checked against the state file and submitted to both; how
   many checkpoints ended up with both cosignatures is printed too), then the shipped
   ``synchronous=NORMAL`` (no fsync per commit) without witnesses;
3. offline export verification (``verify_export``) in entries/s, over an export of
   ``VERIFY_ENTRIES`` realistic entries with a checkpoint every 1,000, requiring two witness
   cosignatures on the newest, naming the implementation that ran (the native hasher, the
   C extension, when it is built; else the pure-Python pass): with the shipped default (one
   worker per available core hashes its share of the entries: threads with the native
   hasher, processes without), in one worker, per CPU-second of all workers, and the
   pure-Python pass (the fallback) with its default, measured in the same run;
4. inclusion and consistency proof sizes at 1,000,000 entries, and the time to serve one
   inclusion proof from the SQLite store.

Aims: >= 20,000 durable appends/s batched on SQLite, >= 500,000 entries/s verification,
proofs O(log n) (20 hashes at 1M).  Sizes are overridable with environment variables
``BENCH_AUDIT_VERIFY`` and ``BENCH_AUDIT_APPENDS``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event

from sandboxsec.audit import verify
from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint
from sandboxsec.audit.cosignature import WitnessKey, cosign, parse_witness_key
from sandboxsec.audit.entry import encode_entry
from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.export import ConsistencyRecord, ExportHeader, render_export
from sandboxsec.audit.merkle import Frontier, MerkleTree, leaf_hash
from sandboxsec.audit.record import AuditRecord
from sandboxsec.audit.verify import implementation, verify_export, worker_count
from sandboxsec.clock import SystemClock
from sandboxsec.services import Services
from sandboxsec.settings import AuditWitness, Settings

VERIFY_ENTRIES = int(os.environ.get("BENCH_AUDIT_VERIFY", "500000"))
APPENDS = int(os.environ.get("BENCH_AUDIT_APPENDS", "20000"))
BATCH_RUNS = 3
PROOF_SIZE = 1_000_000


def record(i: int, tenant: str = "tn_bench") -> AuditRecord:
    return AuditRecord(
        event=AuditEvent.POLICY_DECISION,
        tenant_id=tenant,
        actor_key_id="ak_0123456789abcdef",
        actor_role="agent",
        outcome="allow",
        reason="rule_small_payments",
        object_ids={"session_id": f"ss_{i:032x}", "decision_id": f"dc_{i:032x}"},
        body={"action": "payment", "resource": "acct:checking", "amount": i % 1000},
        sensitive={"grant": f"grant-token-{i}"},
    )


def raw_sha256() -> float:
    data = os.urandom(256)
    sha = hashlib.sha256
    best = 0.0
    for _ in range(3):
        n = 200_000
        start = time.perf_counter()
        for _ in range(n):
            sha(data).digest()
        best = max(best, n / (time.perf_counter() - start))
    return best


def _fsync_every_commit(dbapi_conn: Any, _record: Any) -> None:
    # Runs after the service's own pragmas (listeners run in order): every commit waits for
    # the WAL to reach the disk, so an acknowledged append survives a power loss.
    dbapi_conn.execute("PRAGMA synchronous=FULL")


@contextlib.contextmanager
def witness_processes(tmp: Path, log_vkey: str) -> Iterator[list[AuditWitness]]:
    """Two witnesses as separate processes, as the service would call them."""
    procs: list[subprocess.Popen[str]] = []
    found: list[AuditWitness] = []
    try:
        for i in range(2):
            p = subprocess.Popen(
                [sys.executable, "-m", "sandboxsec.cli", "witness", "serve", "--home",
                 str(tmp / f"w{i}"), "--name", f"w{i}.bench/w", "--log-key", log_vkey,
                 "--port", "0"], stdout=subprocess.PIPE, text=True,
                stderr=subprocess.DEVNULL)
            procs.append(p)
            assert p.stdout is not None
            _, vkey, _, _, url = p.stdout.readline().split()
            found.append(AuditWitness(url=url, key=vkey))
        yield found
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


def appends(
    home: Path, witnesses: list[AuditWitness] | None = None, *, fsync: bool = True
) -> tuple[float, float, float, float, int, float, int, int, float, float]:
    settings = Settings(home=home, audit_checkpoint_every=1000,
                        audit_witnesses=witnesses or [])
    services = Services(settings, clock=SystemClock())
    services.settings.ensure_home()
    if fsync:
        event.listen(services.db.engine, "connect", _fsync_every_commit)
        services.db.engine.dispose()  # no pooled connection keeps the shipped pragma
    services.db.migrate()
    log = services.audit
    try:
        log.append(record(0))  # keys created, writer started
        # a. One caller, one record per commit.
        n = max(500, APPENDS // 10)
        start = time.perf_counter()
        for i in range(n):
            log.append(record(i))
        single = n / (time.perf_counter() - start)
        # b. Many concurrent callers: the group-commit writer batches them.
        threads, per = 64, max(1, APPENDS // 64)

        def caller() -> None:
            for i in range(per):
                log.append(record(i))

        pool = [threading.Thread(target=caller) for _ in range(threads)]
        start = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        grouped = threads * per / (time.perf_counter() - start)
        # c. Explicit batches of 1,000 records per commit.
        batch = [record(i) for i in range(1000)]
        rounds = max(1, APPENDS // 1000)
        # Three runs, their median reported with the spread: one run of ~1 s swings by a third
        # with the disk's fsync latency, the same code back to back.
        rates: list[float] = []
        cpu = time.process_time()
        for _ in range(BATCH_RUNS):
            start = time.perf_counter()
            for _ in range(rounds):
                log.append_many(batch)
            rates.append(rounds * 1000 / (time.perf_counter() - start))
        batched = statistics.median(rates)
        # Per CPU-second of this process (the writer thread included): what the code costs,
        # whatever else shares the machine; the wall figure above adds waiting for the disk.
        batched_cpu = BATCH_RUNS * rounds * 1000 / (time.process_time() - cpu)
        # Whatever was appended verifies.
        data = b"".join(log.export("tn_bench"))
        report = verify_export(
            data, log.keys.public_key,
            witnesses=[parse_witness_key(w.key) for w in witnesses or []],
            min_witnesses=len(witnesses or []),
        )
        # An inclusion proof read from the store (nodes + a leaf block), as the API serves it.
        start = time.perf_counter()
        for i in range(20):
            log.inclusion("tn_bench", (i * 7919) % report.tree_size)
        proof_ms = (time.perf_counter() - start) / 20 * 1000
        # How much of that was witnessed: checkpoints that carry every witness's cosignature
        # (the background submitter keeps only the newest pending checkpoint of a log, so a
        # slow witness path shows as checkpoints left uncosigned, not as slower appends).
        cosigned = log.cosignatures("tn_bench")
        checkpoints = log.reader.checkpoints("tn_bench")
        full = sum(1 for c in checkpoints
                   if len(cosigned.get(c.size, [])) >= len(witnesses or []))
    finally:
        services.close()
    return (single, grouped, batched, proof_ms, report.tree_size, batched_cpu, full,
            len(checkpoints), min(rates), max(rates))


WITNESS_KEYS = [Ed25519PrivateKey.generate() for _ in range(2)]


def synth_export(n: int) -> tuple[bytes, Ed25519PrivateKey]:
    """An export of ``n`` entries built the way the service builds it (entries templated)."""
    key = Ed25519PrivateKey.generate()
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    first = encode_entry(record(0), log_id="tn_bench", seq=0, prev=None, now=now,
                         hmac_key=b"k" * 32).line
    # Entries differ in seq, prev and ids; the rest of the line is shared (speed of setup).
    head, _, tail = first.partition(b',"time":')
    prefix = head[: head.index(b'"seq":') + 6]
    tail = b',"time":' + tail
    lines: list[bytes] = []
    frontier = Frontier()
    notes: list[str] = []
    prev = "0" * 64
    for i in range(n):
        line = b"%s%d,\"prev\":\"%s\"%s" % (prefix, i, prev.encode(), tail)
        h = leaf_hash(line)
        lines.append(line)
        frontier.append(h)
        prev = h.hex()
        if frontier.size % 1000 == 0 or frontier.size == n:
            cp = Checkpoint("sandboxsec.local/audit/tn_bench", frontier.size, frontier.root())
            notes.append(sign_checkpoint(cp, name="sandboxsec.local/audit", private_key=key).note)
    tree = MerkleTree([leaf_hash(ln) for ln in lines])
    sizes = [int(n_.split("\n")[1]) for n_ in notes]
    proofs = [ConsistencyRecord(a, b, tree.consistency_proof(a, b))
              for a, b in itertools.pairwise(sizes)]
    header = ExportHeader("tn_bench", "sandboxsec.local/audit/tn_bench",
                          "sandboxsec.local/audit", 0, n, [], None)
    top = Checkpoint("sandboxsec.local/audit/tn_bench", frontier.size, frontier.root())
    cosigs = [[] for _ in notes[:-1]] + [[
        cosign(top, name=f"w{i}.bench/w", private_key=k, timestamp=1_800_000_000)
        for i, k in enumerate(WITNESS_KEYS)]]
    return b"".join(render_export(header, notes, proofs, lines, cosignatures=cosigs)), key


def _tree_floor(leaves: list[bytes]) -> None:
    """Every node of the RFC 9162 tree over ``leaves`` with plain ``hashlib.sha256`` calls."""
    level = leaves
    while len(level) > 1:
        it = iter(level)
        nxt = [hashlib.sha256(b"\x01" + a + b).digest() for a, b in zip(it, it, strict=False)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt


def verification(n: int) -> tuple[float, float, int, float, float, float, float]:
    """Best-of-3 entries/s by the wall clock and per CPU-second of this process (the shipped
    default), two floors (CPU-second, best of 3 too): the leaf hashes of the same lines alone,
    and those plus the node hashes of the tree over them (the raw SHA-256 calls that any
    verifier recomputing the tree makes: one leaf and about one node hash per entry) with
    ``hashlib``; in one worker; and the pure-Python pass (the fallback) with its default."""
    data, key = synth_export(n)
    lines = data.split(b"\n")
    floor = hash_floor = 0.0
    for _ in range(3):
        cpu = time.process_time()
        leaves = [hashlib.sha256(b"\x00" + ln).digest() for ln in lines]
        floor = max(floor, len(lines) / (time.process_time() - cpu))
        _tree_floor(leaves)
        hash_floor = max(hash_floor, len(lines) / (time.process_time() - cpu))
    best = best_cpu = 0.0
    for _ in range(3):
        start, cpu = time.perf_counter(), _cpu_with_children()
        # The shipped default: one worker process per available core for a large export.
        report = verify_export(
            data, key.public_key(), min_witnesses=2,
            witnesses=[WitnessKey.from_private(f"w{i}.bench/w", k)
                       for i, k in enumerate(WITNESS_KEYS)],
        )
        assert len(report.cosignatures) == 2
        best = max(best, report.entries / (time.perf_counter() - start))
        best_cpu = max(best_cpu, report.entries / (_cpu_with_children() - cpu))
    one = 0.0
    for _ in range(3):
        start = time.perf_counter()
        report = verify_export(data, key.public_key(), workers=1)
        one = max(one, report.entries / (time.perf_counter() - start))
    fallback = 0.0
    native, verify._native = verify._native, None  # as if the extension were not built
    try:
        for _ in range(3):
            start = time.perf_counter()
            report = verify_export(data, key.public_key(), min_witnesses=2, witnesses=[
                WitnessKey.from_private(f"w{i}.bench/w", k) for i, k in enumerate(WITNESS_KEYS)])
            fallback = max(fallback, report.entries / (time.perf_counter() - start))
    finally:
        verify._native = native
    return best, best_cpu, len(data), floor, hash_floor, one, fallback


def _cpu_with_children() -> float:
    """CPU seconds of this process and of its finished worker processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def proof_sizes(n: int) -> tuple[int, int, int]:
    tree = MerkleTree([hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(n)])
    inclusion = max(len(tree.inclusion_proof(i)) for i in (0, n // 3, n - 1))
    consistency = max(len(tree.consistency_proof(m)) for m in (1, n // 3, n - 1, 999_000))
    return inclusion, consistency, 32 * inclusion


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
    from tests.support.benchconfig import describe

    print(describe(Settings(home=Path(tempfile.gettempdir()), audit_checkpoint_every=1000),
                   database="SQLite WAL: synchronous=FULL (durable) and NORMAL (shipped), "
                   "each labelled"))
    sha = raw_sha256()
    print(f"raw sha256 (256 B)             {sha:>12,.0f} hashes/s")
    with tempfile.TemporaryDirectory() as tmp:
        plain = appends(Path(tmp) / "plain")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "witnessed"
        keyed = Services(Settings(home=home))
        keyed.settings.ensure_home()
        keyed.db.migrate()  # the audit key lives in the database: create it as the service does
        vkey = keyed.audit.keys.verifier_key()
        keyed.close()
        with witness_processes(Path(tmp), vkey) as ws:
            witnessed = appends(home, ws)
    with tempfile.TemporaryDirectory() as tmp:
        shipped = appends(Path(tmp) / "shipped", fsync=False)
    print("-- durable: SQLite WAL, synchronous=FULL (the WAL is fsynced at every commit)")
    for label, (single, grouped, batched, proof_ms, size, batched_cpu, full, cps, low,
                high) in (
        ("", plain), (" + 2 witnesses", witnessed),
        (" NORMAL", shipped),
    ):
        if label == " NORMAL":
            print("-- shipped SQLite setting: WAL, synchronous=NORMAL (no fsync per commit: "
                  "survives a process crash, a power loss may lose the last commits)")
        word = "appends" if label == " NORMAL" else "durable appends"
        print(f"{word}, 1 caller{label:15}{single:>10,.0f} /s   ratio to raw sha256 "
              f"1:{sha / single:,.0f}")
        print(f"{word}, 64 callers{label:13}{grouped:>10,.0f} /s   ratio "
              f"1:{sha / grouped:,.0f}   (group commit of one-record callers)")
        print(f"{word}, batches 1000{label:11}{batched:>10,.0f} /s   ratio "
              f"1:{sha / batched:,.0f}   (aim >= 20,000; median of {BATCH_RUNS} runs, "
              f"{low:,.0f} to {high:,.0f})")
        print(f"  the same per CPU-second{label:17}{batched_cpu:>10,.0f} /s   (one core, "
              f"the load on the machine aside)")
        print(f"inclusion proof from the store{label:10}{proof_ms:>9.1f} ms   (log of "
              f"{size:,} entries, incl. signing a fresh checkpoint)")
        if label == " + 2 witnesses":
            print(f"  checkpoints cosigned by both witnesses  {full:,} of {cps:,}")
    print(f"witnessing costs {1 - witnessed[2] / plain[2]:.0%} of batched appends and "
          f"{1 - witnessed[0] / plain[0]:.0%} of single-caller appends (same run)")
    rate, cpu_rate, size, floor, hash_floor, one, fallback = verification(VERIFY_ENTRIES)
    workers = worker_count(None, size)
    kind = "threads" if implementation() == "native" else "processes"
    print(f"export verification            {rate:>12,.0f} entries/s over {VERIFY_ENTRIES:,} "
          f"entries ({size / VERIFY_ENTRIES:.0f} B each)   ratio 1:{sha / rate:.2f} "
          f"(aim >= 500,000; shipped default: {implementation()} hasher, {workers} worker "
          f"{kind} on this machine)")
    print(f"  in one worker (workers=1)    {one:>12,.0f} entries/s")
    print(f"  pure-Python pass (fallback)  {fallback:>12,.0f} entries/s   (same checks, when "
          f"the extension is not built; its default workers, same run)")
    print(f"  per CPU-second (all workers) {cpu_rate:>12,.0f} entries/s   "
          f"(what the work costs, whatever the number of processes)")
    print(f"  floor: leaf hashes alone     {floor:>12,.0f} lines/s   verification is "
          f"{cpu_rate / floor:.2f} of it (a leaf and a node hash per entry bound a hashlib "
          "caller near 0.5)")
    print(f"  floor: leaf + node hashes    {hash_floor:>12,.0f} entries/s verification is "
          f"{cpu_rate / hash_floor:.2f} of it (plain hashlib calls, nothing else checked; the "
          "native hasher, above 1, hashes without an interpreter call per hash)")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    inc, cons, nbytes = proof_sizes(PROOF_SIZE)
    print(f"proofs at {PROOF_SIZE:,} entries       inclusion {inc} hashes ({nbytes} B), "
          f"consistency <= {cons} hashes (log2 n = {PROOF_SIZE.bit_length()})")


if __name__ == "__main__":
    main()
