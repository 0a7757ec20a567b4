"""Waking agents that wait on an approval, within one process and across processes.

Within a process, each waiter holds an :class:`asyncio.Event` registered under the approval id;
whoever changes the state calls :meth:`Wakeups.notify` after committing, which sets the events
from any thread.  Across processes on PostgreSQL, the state change also sends
``NOTIFY sandboxsec_approval, '<id>'`` inside its transaction (so it is delivered only on
commit), and :class:`PgListener` turns those notifications into :meth:`Wakeups.notify` calls in
every process.  SQLite has no notifications: waiters there re-read the database at a bounded
interval as well, which is only needed when several processes share one file.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

import structlog

__all__ = ["CHANNEL", "PgListener", "Wakeups"]

CHANNEL = "sandboxsec_approval"

log = structlog.get_logger("sandboxsec.policy")


class Wakeups:
    """Per-approval events that any thread can set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = (
            defaultdict(set)
        )

    def subscribe(self, approval_id: str) -> asyncio.Event:
        """An event set at the next :meth:`notify` of ``approval_id`` (call from the loop)."""
        event = asyncio.Event()
        with self._lock:
            self._waiters[approval_id].add((asyncio.get_running_loop(), event))
        return event

    def unsubscribe(self, approval_id: str, event: asyncio.Event) -> None:
        with self._lock:
            waiters = self._waiters.get(approval_id)
            if waiters is None:
                return
            for item in [w for w in waiters if w[1] is event]:
                waiters.discard(item)
            if not waiters:
                del self._waiters[approval_id]

    def notify(self, approval_id: str) -> None:
        """Wake every waiter of ``approval_id``; safe from any thread."""
        with self._lock:
            waiters = list(self._waiters.get(approval_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                # The waiter's loop has closed: nobody is listening any more.
                continue

    def waiting(self) -> int:
        """How many waiters are registered (for metrics and tests)."""
        with self._lock:
            return sum(len(w) for w in self._waiters.values())


class PgListener:
    """A thread holding one PostgreSQL connection that LISTENs and forwards notifications."""

    def __init__(self, conninfo: str, wakeups: Wakeups) -> None:
        self._conninfo = conninfo
        self._wakeups = wakeups
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="approval-listener", daemon=True)

    def start(self, wait_seconds: float = 5.0) -> bool:
        """Start listening; True once the LISTEN is in place (waiters also re-check the DB)."""
        self._thread.start()
        return self._ready.wait(wait_seconds)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        backoff = 0.2
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._ready.set()
                    backoff = 0.2
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._wakeups.notify(note.payload)
            except Exception as exc:
                log.warning("approval_listener_reconnect", error=type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
