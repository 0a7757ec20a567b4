"""Bounded in-memory caches of unwrapped keys, and write leases that bound each DEK's use.

Unwrapping a KEK costs a root-key operation (an HSM round trip) and unwrapping a DEK an
AES-GCM call; caching both briefly is what lets the in-process seal path run at memory
speed.  Every cache is bounded three ways, as the AWS Encryption SDK bounds its data-key
cache: by age (``ttl``), by entry count (least recently used evicted first) and, for DEKs
used to seal, by message count (:class:`WriteLease`).  Times are passed in; nothing here
reads the clock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from sandboxsec.crypto.envelope import DataKey

__all__ = ["TtlCache", "WriteLease"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A thread-safe LRU cache whose entries expire ``ttl_seconds`` after insertion."""

    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self._max = max_entries
        self._ttl = timedelta(seconds=ttl_seconds)
        self._items: OrderedDict[K, tuple[datetime, V]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._ttl > timedelta(0)

    def get(self, key: K, now: datetime) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            if hit[0] <= now:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key: K, value: V, now: datetime) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._items[key] = (now + self._ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self._max:
                self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        with self._lock:
            self._items.pop(key, None)

    def discard_where(self, predicate: Callable[[K], bool]) -> None:
        """Drop every entry whose key matches (e.g. all of one tenant's keys)."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class WriteLease:
    """A DEK this process may seal with, at most ``remaining`` more times.

    A DEK is only ever used to seal by the process that created it, so the message bound
    holds without coordinating processes: an exhausted, expired or evicted lease is never
    renewed, a fresh DEK replaces it.
    """

    key: DataKey
    kek_version: int
    remaining: int
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, messages: int = 1) -> bool:
        """Reserve ``messages`` seals; False (nothing reserved) if that passes the bound."""
        with self._lock:
            if self.remaining < messages:
                return False
            self.remaining -= messages
            return True
