"""Encryption throughput: the project's seal path against raw AES-GCM, measured in one run.

Prints, for 1 KiB and 1 MiB records: raw ``AESGCM.encrypt`` (records/s, GB/s), the
project's in-process seal path (``TrajectoryService.seal``: cached data key, key-committed
header, associated data binding tenant/session/record) and the ratio between them; the same
for opening.  Then the streaming format on one 256 MiB record: throughput and peak memory.

Aims: seal path >= 80 % of raw AES-GCM at 1 MiB, >= 100,000 records/s at 1 KiB, peak
memory < 64 MiB for the 256 MiB stream.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandboxsec.crypto.envelope import DataKey, encode_context, open_sealed
from sandboxsec.crypto.stream import open_stream, seal_stream
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.trajectory.format import record_context

KIB, MIB = 1024, 1024 * 1024


def _once(fn: Callable[[], object], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(32):
            fn()
        n += 32
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def compare(
    base: Callable[[], object], ours: Callable[[], object], rounds: int = 7, seconds: float = 0.15
) -> tuple[float, float]:
    """Best records/s of ``base`` and of ``ours``, measured in alternating short rounds so
    both see the same machine load (a shared CI box is noisy)."""
    best_base = best_ours = 0.0
    for _ in range(rounds):
        best_base = max(best_base, _once(base, seconds))
        best_ours = max(best_ours, _once(ours, seconds))
    return best_base, best_ours


def row(label: str, per_s: float, gbps: float, ratio: float | None = None) -> None:
    extra = f"  ratio {ratio:6.1%}" if ratio is not None else ""
    print(f"  {label:<34} {per_s:>12,.0f} rec/s  {gbps:7.3f} GB/s{extra}")


def main() -> int:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Settings(home=Path(tmp)))
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
        from tests.support.benchconfig import describe

        print(describe(services.settings, database="SQLite WAL, synchronous=NORMAL (shipped)"))
        services.settings.ensure_home()
        services.db.migrate()
        svc = services.trajectory
        tenant, session = "tn_bench", "ss_bench"
        raw_key = AESGCM(AESGCM.generate_key(256))
        nonce = os.urandom(12)
        for size in (KIB, MIB):
            data = os.urandom(size)
            svc.seal(tenant, session, "tr_warm", "action", data)  # makes the tenant's keys
            print(f"{size // KIB} KiB records")
            ctx = record_context(tenant, session, "tr_1", "data", "action")
            blob = svc.seal(tenant, session, "tr_1", "action", data)
            ct = raw_key.encrypt(nonce, data, None)
            # the warm data key, for the pure open path
            key = services.key_hierarchy.lease(tenant, session).key
            raw, ours = compare(
                lambda: raw_key.encrypt(nonce, data, None),  # noqa: B023
                lambda: svc.seal(tenant, session, "tr_1", "action", data),  # noqa: B023
            )
            row("raw AESGCM.encrypt", raw, raw * size / 1e9)
            row("seal path (TrajectoryService.seal)", ours, ours * size / 1e9, ours / raw)
            raw_o, ours_o = compare(
                lambda: raw_key.decrypt(nonce, ct, None),  # noqa: B023
                lambda: open_sealed(key, blob, ctx),  # noqa: B023
            )
            row("raw AESGCM.decrypt", raw_o, raw_o * size / 1e9)
            row("open (envelope.open_sealed)", ours_o, ours_o * size / 1e9, ours_o / raw_o)
            if size == KIB and ours < 100_000:
                print("  !! below 100,000 records/s at 1 KiB")
                ok = False
            if size == MIB and ours / raw < 0.8:
                print("  !! below 80 % of raw AES-GCM at 1 MiB")
                ok = False
        services.close()

    total = 256 * MIB
    chunk = os.urandom(MIB)
    key = DataKey.generate()
    ctx = encode_context("tn_bench", "ss_bench", "tr_big", "data", "recording")

    def source() -> Iterator[bytes]:
        for _ in range(total // MIB):
            yield chunk

    def seal_and_open() -> int:
        # Sealed segments go straight into the decryptor: nothing holds the whole record.
        out = 0
        for part in open_stream(lambda _id: key, seal_stream(key, source(), ctx), ctx):
            out += len(part)
        return out

    start = time.perf_counter()
    sealed = sum(len(p) for p in seal_stream(key, source(), ctx))
    t_seal = time.perf_counter() - start
    start = time.perf_counter()
    assert seal_and_open() == total
    t_both = time.perf_counter() - start
    tracemalloc.start()
    seal_and_open()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print("256 MiB streamed record (1 MiB segments)")
    print(f"  seal            {total / t_seal / 1e9:7.3f} GB/s  ({sealed - total} bytes overhead)")
    print(f"  seal + open     {total / t_both / 1e9:7.3f} GB/s")
    print(f"  peak memory     {peak / MIB:7.1f} MiB (Python allocations, seal + open)")
    if peak >= 64 * MIB:
        print("  !! peak memory above 64 MiB")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
