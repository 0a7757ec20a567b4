"""An audit sink for the policy services that never lets a plain params hash through.

A plain ``params_hash`` (SHA-256 of canonical params) next to the clear amount and currency
lets anyone holding an audit export test a list of candidate payees.  Every record the policy
services append passes through :class:`KeyedParamsAudit`, which replaces a body's
``params_hash`` with ``params_hmac``: an HMAC of it under the tenant's digest key
(:mod:`sandboxsec.crypto.digests`), which crypto-shredding destroys.  Grant rows are stored
with the same keyed value (:class:`ParamsDigester` is also what the grant service uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from sandboxsec.audit.record import AuditReceipt, AuditRecord
from sandboxsec.audit.sink import AuditSink

__all__ = ["KeyedParamsAudit", "ParamsDigester"]


class ParamsDigester(Protocol):
    """Keys a params hash for a tenant (the key hierarchy is the real one)."""

    def params_hmac_in(self, session: Any | None, tenant_id: str, params_hash: str) -> str:
        """``params_hmac`` of ``params_hash``, in the caller's transaction when given (the
        tenant's keys may be made there on first use)."""
        ...


class KeyedParamsAudit:
    """An :class:`AuditSink` that swaps ``params_hash`` for ``params_hmac`` in bodies."""

    def __init__(self, sink: AuditSink, digester: ParamsDigester) -> None:
        self._sink = sink
        self._digester = digester

    def _keyed(self, record: AuditRecord, session: Any | None) -> AuditRecord:
        if "params_hash" not in record.body or record.tenant_id is None:
            return record
        body = {k: v for k, v in record.body.items() if k != "params_hash"}
        body["params_hmac"] = self._digester.params_hmac_in(
            session, record.tenant_id, str(record.body["params_hash"]))
        return replace(record, body=body)

    def append(self, record: AuditRecord, *, session: Any | None = None) -> AuditReceipt:
        """Append one record, its params hash keyed."""
        return self._sink.append(self._keyed(record, session), session=session)

    def append_many(
        self, records: Sequence[AuditRecord], *, session: Any | None = None
    ) -> list[AuditReceipt]:
        """Append records in order, their params hashes keyed."""
        return self._sink.append_many([self._keyed(r, session) for r in records],
                                      session=session)
