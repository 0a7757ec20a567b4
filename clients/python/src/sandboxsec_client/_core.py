"""The part of the client that does no I/O: requests as values, answers as values, and the
retry decision between them.

Each operation is written once, as a *flow*: a generator that yields :class:`Call` values and
receives :class:`Answer` values back, and returns the typed result.  The synchronous and the
asynchronous transports drive the same flows, so the two flavours cannot drift apart.

Retry rules (the service promises that a 503 means nothing was done: it fails closed):

1. an answer with status 503 or 429 is retried for every method, after ``Retry-After`` when
   the service sent one (capped), else after exponential backoff with jitter;
2. other 5xx answers (502/504 from a proxy) are retried only for idempotent calls;
3. a connection that could not be opened is retried for every method (nothing was sent);
4. a connection that dropped after the request was sent is retried only for idempotent calls;
   for others the outcome is unknown and :class:`OutcomeUnknownError` says so;
5. a long-poll call keeps reconnecting until its own deadline (a wait survives a dropped
   connection), each time asking the service only for the time that is left;
6. server nonces (RFC 9449 section 8): every ``DPoP-Nonce`` the service sends is kept by the
   proof signer (when it keeps nonces: :class:`NonceKeeper`, e.g. the built-in
   :class:`~sandboxsec_client.proofs.SessionProver`) and goes into the next proof; a 401 with
   ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` to a request that carried a proof is sent
   again ONCE, at once, with a fresh proof carrying the nonce just sent, provided that nonce
   differs from the one the refused proof carried (otherwise retrying cannot help).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from sandboxsec_client.errors import (
    ApiError,
    OutcomeUnknownError,
    TransportError,
    error_for,
)

__all__ = [
    "Answer",
    "Call",
    "Flow",
    "LongPoll",
    "NonceKeeper",
    "Prepared",
    "ProofSigner",
    "RetryPolicy",
    "Session",
    "parse_error",
]

T = TypeVar("T")

#: A session proof signer: ``(method, url, body) -> DPoP header value``.  ``url`` is the
#: target URI without query and fragment (RFC 9449 ``htu``); ``body`` the exact bytes sent.
#: ``None``: this request acts in no session, so it is sent without a proof.
ProofSigner = Callable[[str, str, bytes], str | None]



@runtime_checkable
class NonceKeeper(Protocol):
    """A proof signer that puts the service's last ``DPoP-Nonce`` in its proofs."""

    nonce: str | None


_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_NO_BODY: Any = object()


@dataclass(frozen=True)
class LongPoll:
    """A long-poll: ask for at most ``step`` seconds at a time until ``deadline`` (monotonic)."""

    deadline: float
    step: float
    param: str = "timeout"


@dataclass(frozen=True)
class Call:
    """One API request as a value."""

    method: str
    path: str
    body: Any = _NO_BODY
    params: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    #: Return 4xx answers to the flow instead of raising (a refusal is the answer asked for).
    refusal_ok: bool = False
    long_poll: LongPoll | None = None
    #: Whether to send the API key (public endpoints need none).
    auth: bool = True
    #: Whether repeating the request cannot change the outcome (retries on lost answers).
    idempotent: bool | None = None
    #: Extra request headers (a browser page's ``Origin``, a person's sign-in ``Cookie``);
    #: the API key's ``Authorization`` and the ``DPoP`` proof are set by the client.
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def safe_to_repeat(self) -> bool:
        if self.idempotent is not None:
            return self.idempotent
        return self.method.upper() in _IDEMPOTENT


@dataclass(frozen=True)
class Answer:
    """The service's answer: status, headers (lower-case names) and body."""

    status: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        """The decoded JSON body (``None`` for an empty body)."""
        return json.loads(self.content) if self.content else None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


Flow = Generator[Call, Answer, T]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry (see the module docstring for what is retried)."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 5.0
    #: A ``Retry-After`` longer than this is not waited for: the error is raised instead.
    max_retry_after: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep before attempt ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.max_backoff, self.backoff * (2 ** (attempt - 1)))
        # Full jitter: many agents retrying after the same outage do not return in step.
        return float(base / 2 + random.uniform(0, base / 2))


@dataclass(frozen=True)
class Prepared:
    """A request ready for the wire."""

    method: str
    url: str
    params: dict[str, str]
    headers: dict[str, str]
    content: bytes | None
    timeout: float | None
    #: Whether a ``DPoP`` proof was sent, and the server nonce it carried.
    proved: bool = False
    nonce: str | None = None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP-date: fall back to our own backoff
    return seconds if seconds >= 0 else None


def _asks_for_nonce(challenge: str) -> bool:
    # RFC 9449 section 9: ``WWW-Authenticate: DPoP error="use_dpop_nonce"`` (other
    # parameters, e.g. ``algs``, may follow).
    scheme, _, params = challenge.strip().partition(" ")
    return scheme.lower() == "dpop" and any(
        part.strip() == 'error="use_dpop_nonce"' for part in params.split(","))


def parse_error(answer: Answer) -> ApiError:
    """The family exception for a non-2xx answer."""
    retry_after = _retry_after(answer.headers)
    try:
        err = answer.json()["error"]
        return error_for(answer.status, str(err["code"]), str(err["message"]), retry_after)
    except (ValueError, KeyError, TypeError):
        return error_for(answer.status, f"http_{answer.status}", "no error document",
                         retry_after)


class Session:
    """What both transports share: base URL, key, proof signer, retry policy, clock.

    ``Session.prepare`` builds a request; ``Session.after_answer`` and
    ``Session.after_failure`` decide between returning, raising and retrying.
    """

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float,
                 retry: RetryPolicy, proof: ProofSigner | None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.base_url = base_url.rstrip("/")
        # The key travels only in this header; it is never part of a URL or an error.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retry = retry
        self.proof = proof
        self.monotonic = monotonic
        self._nonces = proof if isinstance(proof, NonceKeeper) else None

    def prepare(self, call: Call) -> Prepared:
        """The request for this attempt (a long-poll asks only for the time left)."""
        url = f"{self.base_url}{call.path}"
        params = dict(call.params)
        timeout = call.timeout if call.timeout is not None else self.timeout
        if call.long_poll is not None:
            left = max(0.0, min(call.long_poll.step, call.long_poll.deadline - self.monotonic()))
            params[call.long_poll.param] = f"{left:.3f}"
            timeout = left + self.timeout  # the answer may take the whole step to come
        headers: dict[str, str] = {"Accept": "application/json", **call.headers}
        if call.auth:
            headers.update(self._auth)
        content: bytes | None = None
        nonce = self._nonces.nonce if self._nonces is not None else None
        if call.body is not _NO_BODY:
            content = json.dumps(call.body, separators=(",", ":"),
                                 ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.proof is not None and call.auth:
            # A fresh proof per attempt: each carries its own unique id and time.
            parts = urlsplit(url)
            htu = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            value = self.proof(call.method.upper(), htu, content or b"")
            if value is not None:
                headers["DPoP"] = value
        return Prepared(call.method.upper(), url, params, headers, content, timeout,
                        proved="DPoP" in headers, nonce=nonce)

    def renew_nonce(self, sent: Prepared, answer: Answer) -> bool:
        """Keep the answer's ``DPoP-Nonce`` (if any) for the next proofs; ``True`` when the
        answer asks for this request again with it (rule 6 of the module docstring).

        The transports call this for every answer and resend at most once per call.
        """
        fresh = answer.headers.get("dpop-nonce")
        if fresh is None or self._nonces is None:
            return False
        self._nonces.nonce = fresh
        return (answer.status == 401 and sent.proved and fresh != sent.nonce
                and _asks_for_nonce(answer.headers.get("www-authenticate", "")))

    def after_answer(self, call: Call, answer: Answer, attempt: int) -> Answer | float:
        """The answer to hand back, or seconds to wait before the next attempt; may raise."""
        if answer.ok:
            return answer
        if answer.status in (429, 503) or (answer.status >= 500 and call.safe_to_repeat):
            err = parse_error(answer)
            if attempt < self.retry.attempts and (
                err.retry_after is None or err.retry_after <= self.retry.max_retry_after
            ):
                return self.retry.delay(attempt, err.retry_after)
            raise err
        if call.refusal_ok and answer.status < 500:
            return answer
        raise parse_error(answer)

    def after_failure(self, call: Call, exc: Exception, attempt: int, *,
                      sent: bool) -> float:
        """Seconds to wait before reconnecting after a transport failure; may raise."""
        if call.long_poll is not None and self.monotonic() < call.long_poll.deadline:
            return self.retry.delay(min(attempt, 8), None)
        if attempt < self.retry.attempts and (not sent or call.safe_to_repeat):
            return self.retry.delay(attempt, None)
        if sent and not call.safe_to_repeat:
            raise OutcomeUnknownError(
                f"{call.method} {call.path}: the connection was lost after the request was "
                f"sent ({type(exc).__name__}); it may or may not have taken effect"
            ) from exc
        raise TransportError(f"{call.method} {call.path}: {type(exc).__name__}: {exc}") from exc


def raw_call(method: str, path: str, *, json: Any = None,
             params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
             auth: bool = True, refusal_ok: bool = False) -> Call:
    """A :class:`Call` for a route the typed clients do not wrap (``json=None``: no body)."""
    return Call(method.upper(), path, body=_NO_BODY if json is None else json,
                params=dict(params or {}), headers=dict(headers or {}), auth=auth,
                refusal_ok=refusal_ok)


def expect_json(answer: Answer) -> Any:
    """The JSON body of a 2xx answer (flows receive only those unless ``refusal_ok``)."""
    if not answer.ok:
        raise parse_error(answer)
    return answer.json()


def run_sync(flow: Flow[T], send: Callable[[Call], Answer]) -> T:
    """Drive ``flow`` with a blocking ``send``."""
    try:
        call = next(flow)
        while True:
            call = flow.send(send(call))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
