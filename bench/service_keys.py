"""Service keys: what signing inside the HSM and joining a cluster cost, measured in one run.

Prints:

1. in memory: raw Ed25519 signatures/s (pyca, the primitive) and compact JWS tokens/s through
   ``sandboxsec.jose.sign_compact`` (joserfc), with the ratio to the primitive;
2. in the HSM (SoftHSM2 in a temp dir, ``CKM_EDDSA``, the shipped configuration): raw
   signatures/s through the provider's session and JWS tokens/s through the signer hook
   (which also verifies each signature before the token leaves), with the ratio to the raw
   HSM rate;
3. joining: the time a second node takes to establish the cluster's service keys (read the
   table, unwrap two secrets and two private keys with the root key) on SQLite.

Usage: ``python bench/service_keys.py [--seconds S]``.  Nothing is tuned: default settings,
no ``gc.freeze``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec import jose
from sandboxsec.clock import SystemClock
from sandboxsec.crypto.keys import LocalKeyProvider, Pkcs11KeyProvider
from sandboxsec.crypto.service_keys import ServiceKeys
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.storage.db import Database

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
HEADER = {"kid": "bench", "typ": "JWT"}
PAYLOAD = b'{"iss":"urn:sandboxsec","sub":"bench","exp":1900000000}'


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls of ``fn`` per second over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(20):
            fn()
        n += 20
    return n / elapsed


def in_memory(seconds: float) -> None:
    key = Ed25519PrivateKey.generate()
    raw = rate(lambda: key.sign(PAYLOAD), seconds)
    token = rate(lambda: jose.sign_compact(HEADER, PAYLOAD, key), seconds)
    print(f"in memory: raw Ed25519 {raw:,.0f}/s; JWS {token:,.0f}/s ({token / raw:.0%} of raw)")


def in_hsm(seconds: float, tmp: Path) -> None:
    if not Path(SOFTHSM).exists() or shutil.which("softhsm2-util") is None:
        print("in the HSM: skipped (SoftHSM2 is not installed)")
        return
    (tmp / "tokens").mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tmp / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin",
                    "12345678", "--so-pin", "87654321"], check=True, capture_output=True)
    provider = Pkcs11KeyProvider(SOFTHSM, "bench", "12345678", "bench-root")
    signer = HsmEd25519Signer(provider, "bench-root/token")
    signer.public_key()
    raw = rate(lambda: signer.sign(PAYLOAD), seconds)
    token = rate(lambda: jose.sign_compact(HEADER, PAYLOAD, signer), seconds)
    print(f"in the HSM (SoftHSM2): raw CKM_EDDSA {raw:,.0f}/s; JWS through the hook "
          f"{token:,.0f}/s ({token / raw:.0%} of raw)")
    provider.close()


def joining(tmp: Path) -> None:
    first, second = tmp / "a", tmp / "b"
    first.mkdir(mode=0o700)
    url = f"sqlite:///{first / 'sandboxsec.db'}"
    db = Database(url)
    db.migrate()
    ServiceKeys(db, SystemClock(), LocalKeyProvider(first), first).establish()
    second.mkdir(mode=0o700)
    shutil.copy2(first / "root.key", second / "root.key")
    times = []
    for _ in range(20):
        keys = ServiceKeys(db, SystemClock(), LocalKeyProvider(second), second)
        start = time.perf_counter()
        keys.establish()
        times.append(time.perf_counter() - start)
    times.sort()
    print(f"joining (SQLite, local root key): establish p50 {times[10] * 1e3:.2f} ms, "
          f"max {times[-1] * 1e3:.2f} ms")
    db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        in_memory(args.seconds)
        (tmp / "hsm").mkdir()
        in_hsm(args.seconds, tmp / "hsm")
        joining(tmp)


if __name__ == "__main__":
    main()
