"""A worker process for the key-creation race tests: importable without the test suite's
fixtures (the processes are spawned, so each imports only this module and the provider)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandboxsec.crypto.keys import Pkcs11KeyProvider
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.crypto.tenant_keys import Pkcs11TenantKeyStore

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
AAD = b"sandboxsec/test/race"


def racer(token: str, pin: str, label: str, lock_dir: str, n: int, barrier: Any,
          out: Any) -> None:
    """One worker: wait for all the others, then use the three kinds of key at once; put
    ``(n, root blob, tenant blob, signing public key, error or None)`` on ``out``."""
    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, token, pin, label, lock_dir=Path(lock_dir))
    store = Pkcs11TenantKeyStore(provider, label)
    signer = HsmEd25519Signer(provider, f"{label}/audit-checkpoint")
    try:
        barrier.wait(timeout=120)
        secret = bytes([n]) * 32
        root_blob = provider.wrap(secret, AAD)
        tenant_blob = store.wrap("tn_race", secret, AAD, create=True)
        public = signer.public_key().public_bytes_raw()
        out.put((n, root_blob, tenant_blob, public, None))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((n, b"", b"", b"", f"{type(exc).__name__}: {exc}"))
    finally:
        provider.close()
