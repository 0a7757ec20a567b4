"""The key gate: every ``/v1`` request's API key is checked, and rate limited, before its body
is read.

Why here and not in the route: the body (up to ``SANDBOXSEC_MAX_BODY_BYTES``) is read, buffered
and scanned by :class:`~sandboxsec.api.middleware.RequestGuard` before any route runs, so a
caller without a key could make every worker buffer and parse 16 MiB per request.  The gate
runs first: no key, a bad key or a key over its rate gets its answer before one byte of the
body is read.  The principal it found is handed to the route (``deps.require``) so the key is
looked up once per request.

The people's routes carry no API key: enrolment is authorized by its one-time link, sign-in by
a passkey, the signed-in person's calls by the sign-in cookie.  They are not simply exempt:
:class:`PersonGate` checks, also before the body is read, what can be checked without it (the
caller's address is within its rate, a state change comes from the configured public origin,
the enrolment link is live, the sign-in cookie is valid) and their bodies get a small limit of
their own (a WebAuthn response is a few kilobytes).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sandboxsec.errors import RateLimitedError
from sandboxsec.people.errors import OriginForbiddenError
from sandboxsec.principal import Principal
from sandboxsec.tenants.errors import ApiKeyInvalidError

__all__ = ["EXEMPT_PREFIXES", "PERSON_COOKIE", "KeyGate", "PersonGate", "RateLimiter",
           "bearer_token", "person_route"]

#: The sign-in cookie of the approval pages (HttpOnly, SameSite=Strict).
PERSON_COOKIE = "sandboxsec_person"

#: ``/v1`` paths that take a body without any check here (none: the people's routes, which
#: carry no API key, go through :class:`PersonGate`).
EXEMPT_PREFIXES: tuple[str, ...] = ()

# The people's routes (sandboxsec/api/routes/people.py), by how each is authorized.
_PERSON_ROUTES = re.compile(
    r"/v1/(?:(?P<enrol>enroll/(?P<token>[^/]{1,100})/(?:options|register))"
    r"|(?P<signin>signin/options|signin|signout)"
    r"|(?P<me>me(?:/.*)?))")
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


def person_route(path: str) -> tuple[str, str | None] | None:
    """How a ``/v1`` path without an API key is authorized: ``("enrol", token)``,
    ``("signin", None)`` or ``("me", None)``; ``None`` for every other path (an API key's)."""
    m = _PERSON_ROUTES.fullmatch(path)
    if m is None:
        return None
    if m.group("enrol"):
        return "enrol", m.group("token")
    return ("signin", None) if m.group("signin") else ("me", None)


class Authenticate(Protocol):
    """Checks a presented key; ``remote`` (the caller's address) goes into a refusal's audit
    entry."""

    def __call__(self, presented: str, *, remote: str | None = None) -> Principal: ...


@dataclass
class KeyGate:
    """Authenticates a key (a database read) and applies its rate limit."""

    authenticate: Authenticate
    limiter: RateLimiter

    def admit(self, header: str, remote: str | None = None) -> tuple[str, Principal]:
        """The key and its principal, or ``api_key_invalid`` / ``rate_limited``."""
        token = bearer_token(header)
        principal = self.authenticate(token, remote=remote)
        wait = self.limiter.take(principal.key_id)
        if wait > 0:
            raise RateLimitedError("too many requests with this API key",
                                   retry_after=max(1, math.ceil(wait)))
        return token, principal


@dataclass
class PersonGate:
    """The people's routes, before their bodies are read (see the module docstring).

    ``signed_in(cookie)`` returns the signed-in person (or raises ``signin_required``);
    ``enrolment(token)`` raises ``enrolment_invalid`` for a link that is not live.  The rate
    is per caller address: behind a proxy every person shares its address, so size it for
    the proxy (docs/configuration.md).
    """

    origins: tuple[str, ...]
    limiter: RateLimiter
    signed_in: Callable[[str | None], object]
    enrolment: Callable[[str], None]
    max_body: int

    def admit(self, kind: str, token: str | None, *, has_body: bool, origin: str | None,
              cookie: str | None, remote: str | None) -> object | None:
        """The signed-in person (``me`` routes) or ``None``; raises the refusal."""
        wait = self.limiter.take("addr:" + (remote or "?"))
        if wait > 0:
            raise RateLimitedError("too many passkey requests from this address",
                                   retry_after=max(1, math.ceil(wait)))
        # Who first (no sign-in: 401), then where from (another site's page: 403).
        person = self.signed_in(cookie) if kind == "me" else None
        if has_body and (origin is None or origin not in self.origins):
            # A page of another site cannot enrol, sign in or decide for anyone.
            raise OriginForbiddenError("this request must come from the approval page's "
                                       "origin")
        if kind == "enrol":
            assert token is not None
            self.enrolment(token)
        return person
