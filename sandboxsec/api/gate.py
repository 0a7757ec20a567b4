"""The key gate: every ``/v1`` request's API key is checked, and rate limited, before its body
is read.

Why here and not in the route: the body (up to ``SANDBOXSEC_MAX_BODY_BYTES``) is read, buffered
and scanned by :class:`~sandboxsec.api.middleware.RequestGuard` before any route runs, so a
caller without a key could make every worker buffer and parse 16 MiB per request.  The gate
runs first: no key, a bad key or a key over its rate gets its answer before one byte of the
body is read.  The principal it found is handed to the route (``deps.require``) so the key is
looked up once per request.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sandboxsec.errors import RateLimitedError
from sandboxsec.principal import Principal
from sandboxsec.tenants.errors import ApiKeyInvalidError

__all__ = ["EXEMPT_PREFIXES", "KeyGate", "RateLimiter", "bearer_token"]

#: ``/v1`` paths that take a body without an API key (none today; a route authenticating
#: another way, a passkey sign-in say, adds its prefix here).
EXEMPT_PREFIXES: tuple[str, ...] = ()
_MAX_TRACKED = 100_000


def bearer_token(header: str) -> str:
    """The key of an ``Authorization: Bearer <key>`` header, or ``api_key_invalid``."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiKeyInvalidError("send 'Authorization: Bearer <api key>'")
    return value.strip()


class RateLimiter:
    """A token bucket per API key, in this worker process.

    Each key may make ``rate`` requests a second on average and ``burst`` at once.  The
    buckets live in the worker: with W workers behind one port a key gets up to W times the
    rate (the kernel spreads connections over workers); set the rate per worker accordingly
    (docs/operations.md).  ``rate`` 0 turns the limit off.
    """

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst or math.ceil(rate * 2))
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a request of ``key`` may run now, else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            while len(self._buckets) > _MAX_TRACKED:
                self._buckets.popitem(last=False)
        return wait


@dataclass
class KeyGate:
    """Authenticates a key (a database read) and applies its rate limit."""

    authenticate: Callable[[str], Principal]
    limiter: RateLimiter

    def admit(self, header: str) -> tuple[str, Principal]:
        """The key and its principal, or ``api_key_invalid`` / ``rate_limited``."""
        token = bearer_token(header)
        principal = self.authenticate(token)
        wait = self.limiter.take(principal.key_id)
        if wait > 0:
            raise RateLimitedError("too many requests with this API key",
                                   retry_after=max(1, math.ceil(wait)))
        return token, principal
