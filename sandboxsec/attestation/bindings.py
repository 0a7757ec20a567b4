"""Bound AKs on the verification hot path: a per-process cache the transaction re-checks.

A verdict depends on the AK's binding (which EK, through which certificate chain) and on the
last clock the AK quoted.  Reading the binding row in a transaction of its own before every
verification cost a transaction per pair; instead each worker keeps a snapshot of the rows it
has seen and the verdict's own transaction proves the snapshot is still the stored state:

* an affirming verdict advances the clock with one conditional ``UPDATE`` that matches the
  row id *and* the clock the snapshot holds; if another worker advanced the clock, or the AK
  was unbound or bound again (a new row id), nothing matches and the verdict is judged again
  on the row read under the lock;
* any other verdict reads the row in the transaction (locked on PostgreSQL) and is judged
  again when it differs.

So a cached binding never decides anything on its own: an unbound or re-bound AK, or a clock
moved by another worker, takes effect on the very next verification in every process.  The
EK chain of a snapshot is still checked against the current revocation data on every use.

Core statements throughout: the ORM's unit of work costs more than these statements.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Final, cast

from sqlalchemy import Table, and_, bindparam, or_, select, update
from sqlalchemy.engine import Connection

from sandboxsec.attestation import quote
from sandboxsec.attestation.models import BoundAk
from sandboxsec.attestation.verifier import Binding
from sandboxsec.encoding import b64decode_strict

__all__ = ["BindingCache", "BindingSnapshot", "advance_clock", "load_binding"]

_BOUND_AKS = cast(Table, BoundAk.__table__)  # type: ignore[attr-defined]
_CACHE_MAX: Final = 65_536


@dataclass(frozen=True, slots=True)
class BindingSnapshot:
    """One ``attestation_bound_aks`` row as a value: the binding and the last accepted clock."""

    id: str
    tenant_id: str
    ak_name: str  # hex
    ek_fingerprint: str
    ek_chain: tuple[bytes, ...]  # DER, leaf first
    clock: quote.ClockInfo | None

    def binding(self) -> Binding:
        """The verifier's view of this binding."""
        return Binding(ak_name=bytes.fromhex(self.ak_name), ek_fingerprint=self.ek_fingerprint,
                       last_clock=self.clock)

    def state(self) -> tuple[object, ...]:
        """What a verdict depends on in the row (compared with the locked row)."""
        clock = None if self.clock is None else (
            self.clock.reset_count, self.clock.restart_count, self.clock.clock)
        return (self.id, self.ek_fingerprint, clock)

    def advanced(self, clock: quote.ClockInfo) -> BindingSnapshot:
        """This snapshot after ``clock`` was stored."""
        return replace(self, clock=quote.ClockInfo(clock=clock.clock,
                                                   reset_count=clock.reset_count,
                                                   restart_count=clock.restart_count,
                                                   safe=True))


def _clock_of(reset: int | None, restart: int | None, clock: str | None) -> quote.ClockInfo | None:
    if reset is None or restart is None:
        return None
    return quote.ClockInfo(clock=int(clock or 0), reset_count=reset, restart_count=restart,
                           safe=True)


_T = _BOUND_AKS.c
# Statements built once (building them per call cost more than running them).
_SELECT = select(_T.id, _T.ek_fingerprint, _T.ek_certificate, _T.last_reset_count,
                 _T.last_restart_count, _T.last_clock).where(
    _T.tenant_id == bindparam("tenant_id"), _T.ak_name == bindparam("ak_name"))
_SELECT_LOCKED = _SELECT.with_for_update()
_NEW_CLOCK: dict[str, Any] = {"last_reset_count": bindparam("reset"),
                              "last_restart_count": bindparam("restart"),
                              "last_clock": bindparam("clock")}
_ADVANCE = update(_BOUND_AKS).where(_T.id == bindparam("row_id")).values(_NEW_CLOCK)
_ADVANCE_FROM_NONE = update(_BOUND_AKS).where(
    _T.id == bindparam("row_id"),
    or_(_T.last_reset_count.is_(None), _T.last_restart_count.is_(None)),
).values(_NEW_CLOCK)
_ADVANCE_FROM = update(_BOUND_AKS).where(
    _T.id == bindparam("row_id"),
    and_(_T.last_reset_count == bindparam("was_reset"),
         _T.last_restart_count == bindparam("was_restart"),
         _T.last_clock == bindparam("was_clock")),
).values(_NEW_CLOCK)


def load_binding(conn: Connection, tenant_id: str, ak_name: str, *, lock: bool,
                 postgres: bool) -> BindingSnapshot | None:
    """The stored binding of ``ak_name`` in ``tenant_id``, or None; ``lock`` takes the row
    lock on PostgreSQL (SQLite's writer lock already serialises writers)."""
    stmt = _SELECT_LOCKED if lock and postgres else _SELECT
    row = conn.execute(stmt, {"tenant_id": tenant_id, "ak_name": ak_name}).first()
    if row is None:
        return None
    chain = tuple(b64decode_strict(c) for c in row.ek_certificate.split(","))
    return BindingSnapshot(
        id=row.id, tenant_id=tenant_id, ak_name=ak_name, ek_fingerprint=row.ek_fingerprint,
        ek_chain=chain,
        clock=_clock_of(row.last_reset_count, row.last_restart_count, row.last_clock),
    )


def advances(snapshot: BindingSnapshot, clock: quote.ClockInfo) -> bool:
    """True when ``clock`` is later than the snapshot's last accepted clock."""
    previous = snapshot.clock
    if previous is None:
        return True
    return (clock.reset_count, clock.restart_count, clock.clock) > (
        previous.reset_count, previous.restart_count, previous.clock)


def advance_clock(conn: Connection, snapshot: BindingSnapshot, clock: quote.ClockInfo, *,
                  conditional: bool) -> bool:
    """Store ``clock`` as the AK's last clock.

    ``conditional``: only if the row still is ``snapshot`` (same id, same last clock); False
    when it is not, and nothing was written.  Unconditional writes are for a caller that read
    the row under the lock in this transaction.
    """
    params: dict[str, Any] = {"row_id": snapshot.id, "reset": clock.reset_count,
                              "restart": clock.restart_count, "clock": str(clock.clock)}
    stmt: Any = _ADVANCE
    if conditional:
        last = snapshot.clock
        if last is None:
            stmt = _ADVANCE_FROM_NONE
        else:
            stmt = _ADVANCE_FROM
            params.update(was_reset=last.reset_count, was_restart=last.restart_count,
                          was_clock=str(last.clock))
    done = conn.execute(stmt, params)
    return int(getattr(done, "rowcount", 0)) == 1


class BindingCache:
    """Snapshots of bound AKs by (tenant, AK name), least recently used evicted first.

    A hint, never an authority: see the module docstring for how every verdict re-checks it.
    """

    def __init__(self, max_entries: int = _CACHE_MAX) -> None:
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], BindingSnapshot] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: str, ak_name: str) -> BindingSnapshot | None:
        """The snapshot seen last, or None."""
        with self._lock:
            hit = self._entries.get((tenant_id, ak_name))
            if hit is not None:
                self._entries.move_to_end((tenant_id, ak_name))
            return hit

    def put(self, snapshot: BindingSnapshot) -> None:
        """Remember ``snapshot`` (the stored state as of a committed transaction)."""
        with self._lock:
            key = (snapshot.tenant_id, snapshot.ak_name)
            self._entries[key] = snapshot
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def forget(self, tenant_id: str, ak_name: str) -> None:
        """Drop a snapshot (the row was found gone or changed)."""
        with self._lock:
            self._entries.pop((tenant_id, ak_name), None)
