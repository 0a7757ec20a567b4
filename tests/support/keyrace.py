"""A process that makes a tenant's first keys at the same moment as others (spawned by
tests/integration/crypto/test_first_keys_race.py; importable, as ``spawn`` needs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def first_digest(home: str, db_url: str, tenant_id: str, params_hash: str, barrier: Any,
                 out: Any) -> None:
    """Key ``params_hash`` for the tenant in a transaction of this process's own service
    stack, as a server worker does on the tenant's first policy decision; report
    ``(digest, error)`` on ``out``."""
    from sandboxsec.services import Services
    from sandboxsec.settings import Settings
    from sandboxsec.storage.db import Database

    svc = Services(Settings(home=Path(home), public_url="http://testserver"),
                   db=Database(db_url, timeout_seconds=30))
    try:
        keys = svc.key_hierarchy  # built before the barrier: the race is on keys, not imports
        barrier.wait()
        with svc.db.session() as s:
            out.put((keys.params_hmac_in(s, tenant_id, params_hash), None))
    except Exception as exc:  # reported to the test, which fails on it
        out.put((None, f"{type(exc).__name__}: {exc}"))
    finally:
        svc.close()
