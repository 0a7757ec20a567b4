"""Image digest and manifest verification speed, against the raw primitives in the same run.

1. Streamed SHA-256 of an image file (``sandboxsec.attestation.digest.sha256_file``) against
   ``hashlib.sha256`` over the same bytes already in memory, and against the standard
   library's ``hashlib.file_digest``; plus the streamed digest's peak Python memory.
2. Manifest verification (``verify_manifest``: DSSE parse, chain of two certificates,
   ECDSA P-256 signature, statement) and the cached path (``ManifestVerifier``), against one
   raw ECDSA P-256 verification.

    .venv/bin/python bench/image_digest.py [--size-mib 1024]

Aim: streamed digest >= 90 % of in-memory hashlib; peak memory a few MiB whatever the size.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from sandboxsec.attestation.digest import sha256_file
from sandboxsec.attestation.image import ManifestVerifier, sign_manifest, verify_manifest
from tests.support.pki import NOW, make_publisher, sample_reference

MIB = 1024 * 1024


def best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ops_per_second(fn: Callable[[], object], min_seconds: float = 0.6) -> float:
    best = 0.0
    for _ in range(3):
        n, start = 0, time.perf_counter()
        while True:
            for _ in range(32):
                fn()
            n += 32
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 3:
                break
        best = max(best, n / elapsed)
    return best


def _in_memory(path: Path) -> tuple[float, str]:
    data = path.read_bytes()  # also warms the page cache for the file-based runs
    seconds = best_seconds(lambda: hashlib.sha256(data).digest())
    return seconds, "sha256:" + hashlib.sha256(data).hexdigest()


def bench_digest(size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.bin"
        block = os.urandom(MIB)
        with path.open("wb") as fh:
            for _ in range(size // MIB):
                fh.write(block)
        raw, expected = _in_memory(path)

        def stdlib() -> None:
            with path.open("rb") as fh:
                hashlib.file_digest(fh, "sha256")

        std = best_seconds(stdlib)
        ours = best_seconds(lambda: sha256_file(path))
        assert sha256_file(path) == expected

        tracemalloc.start()
        sha256_file(path)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    gb = size / 1e9
    print(f"streamed image digest, {size // MIB} MiB file (page cache warm)")
    print(f"  hashlib.sha256 over bytes in memory  {gb / raw:7.3f} GB/s  (raw primitive)")
    print(f"  hashlib.file_digest (stdlib stream)  {gb / std:7.3f} GB/s  ratio {raw / std:6.1%}")
    print(f"  sandboxsec sha256_file               {gb / ours:7.3f} GB/s  ratio {raw / ours:6.1%}")
    print(
        f"  sha256_file peak Python memory       {peak / MIB:7.2f} MiB for a {size // MIB} MiB file"
    )


def bench_manifest() -> None:
    pub = make_publisher("p256")
    trust = pub.trust()
    envelope = sign_manifest(
        image_name="bench.qcow2",
        image_digest="sha256:" + "ab" * 32,
        version="1",
        expires_at=NOW.replace(year=2027),
        reference=sample_reference(),
        key=pub.leaf.key,
        cert_chain=pub.chain,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    message = os.urandom(600)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()

    raw = ops_per_second(lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())))
    full = ops_per_second(lambda: verify_manifest(envelope, trust, NOW))
    cached_verifier = ManifestVerifier(trust)
    cached = ops_per_second(lambda: cached_verifier.verify(envelope, NOW))
    print("image manifest verification (ECDSA P-256 publisher, one intermediate)")
    print(f"  raw ECDSA P-256 verify               {raw:>10,.0f} /s  (raw primitive)")
    print(f"  verify_manifest (3 signatures total) {full:>10,.0f} /s  ratio {full / raw:6.1%}")
    print(f"  ManifestVerifier, cached             {cached:>10,.0f} /s  ratio {cached / raw:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    from tests.support.benchconfig import describe

    print(describe(database="no database: the digest and manifest code, as the service runs it"))
    bench_digest(args.size_mib * MIB)
    bench_manifest()


if __name__ == "__main__":
    main()
