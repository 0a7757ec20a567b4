"""The two transports that drive flows: blocking (``httpx.Client``) and async
(``httpx.AsyncClient``).  All decisions are made by :class:`._core.Session`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import httpx

from sandboxsec_client._core import (
    Answer,
    Call,
    Flow,
    ProofSigner,
    RetryPolicy,
    Session,
    expect_json,
    raw_call,
    run_sync,
)

__all__ = ["AsyncTransport", "SyncTransport"]

T = TypeVar("T")

# Failures where the request cannot have reached the service: always safe to retry.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _answer(r: httpx.Response) -> Answer:
    return Answer(r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


class SyncTransport:
    """Blocking transport: one ``httpx.Client`` (yours if you pass ``http``, then not closed
    here), the API key, an optional ``DPoP`` proof signer and the retry policy."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, proof: ProofSigner | None = None,
                 http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._session = Session(base_url, api_key, timeout=timeout,
                               retry=retry or RetryPolicy(), proof=proof)
        self._owns = http is None
        self._http = http if http is not None else httpx.Client()
        self._sleep = sleep

    @property
    def base_url(self) -> str:
        return self._session.base_url

    def send(self, call: Call) -> Answer:
        """One call, with the retries the policy allows."""
        attempt = 0
        renewed = False  # resent once with a server nonce (rule 6 of _core)
        while True:
            attempt += 1
            p = self._session.prepare(call)
            try:
                r = self._http.request(p.method, p.url, params=p.params, headers=p.headers,
                                       content=p.content, timeout=p.timeout)
                answer = _answer(r)
                if self._session.renew_nonce(p, answer) and not renewed:
                    # The service asked for its nonce: not a failed attempt.
                    renewed, attempt = True, attempt - 1
                    continue
                outcome = self._session.after_answer(call, answer, attempt)
            except httpx.TransportError as exc:
                outcome = self._session.after_failure(call, exc, attempt,
                                                     sent=not isinstance(exc, _NOT_SENT))
            if isinstance(outcome, Answer):
                return outcome
            self._sleep(outcome)

    def run(self, flow: Flow[T]) -> T:
        """Drive one flow to its result."""
        return run_sync(flow, self.send)

    def call(self, method: str, path: str, *, json: Any = None,
             params: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None, auth: bool = True) -> Any:
        """A route the typed methods do not wrap: its decoded JSON answer, or the family
        :class:`~sandboxsec_client.errors.ApiError` of a refusal.  Same key, proofs, nonces
        and retries as every other call; ``headers`` add e.g. a page's ``Origin`` or a
        person's sign-in ``Cookie``."""
        return expect_json(self.send(raw_call(method, path, json=json, params=params,
                                              headers=headers, auth=auth)))

    def request(self, method: str, path: str, *, json: Any = None,
                params: Mapping[str, str] | None = None,
                headers: Mapping[str, str] | None = None, auth: bool = True) -> Answer:
        """Like :meth:`call`, but a refusal (4xx) is returned as the raw :class:`Answer`
        (status, lower-case headers, body) instead of raised."""
        return self.send(raw_call(method, path, json=json, params=params, headers=headers,
                                  auth=auth, refusal_ok=True))

    def close(self) -> None:
        """Close the HTTP client if this transport made it."""
        if self._owns:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncTransport:
    """The same over ``httpx.AsyncClient`` (asyncio or trio)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, proof: ProofSigner | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        self._session = Session(base_url, api_key, timeout=timeout,
                               retry=retry or RetryPolicy(), proof=proof)
        self._owns = http is None
        self._http = http if http is not None else httpx.AsyncClient()

    @property
    def base_url(self) -> str:
        return self._session.base_url

    async def send(self, call: Call) -> Answer:
        """One call, with the retries the policy allows."""
        attempt = 0
        renewed = False  # resent once with a server nonce (rule 6 of _core)
        while True:
            attempt += 1
            p = self._session.prepare(call)
            try:
                r = await self._http.request(p.method, p.url, params=p.params,
                                             headers=p.headers, content=p.content,
                                             timeout=p.timeout)
                answer = _answer(r)
                if self._session.renew_nonce(p, answer) and not renewed:
                    # The service asked for its nonce: not a failed attempt.
                    renewed, attempt = True, attempt - 1
                    continue
                outcome = self._session.after_answer(call, answer, attempt)
            except httpx.TransportError as exc:
                outcome = self._session.after_failure(call, exc, attempt,
                                                     sent=not isinstance(exc, _NOT_SENT))
            if isinstance(outcome, Answer):
                return outcome
            await anyio.sleep(outcome)

    async def call(self, method: str, path: str, *, json: Any = None,
                   params: Mapping[str, str] | None = None,
                   headers: Mapping[str, str] | None = None, auth: bool = True) -> Any:
        """As :meth:`SyncTransport.call`."""
        return expect_json(await self.send(raw_call(method, path, json=json, params=params,
                                                    headers=headers, auth=auth)))

    async def request(self, method: str, path: str, *, json: Any = None,
                      params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | None = None, auth: bool = True) -> Answer:
        """As :meth:`SyncTransport.request`."""
        return await self.send(raw_call(method, path, json=json, params=params,
                                        headers=headers, auth=auth, refusal_ok=True))

    async def run(self, flow: Flow[T]) -> T:
        """Drive one flow to its result."""
        try:
            call = next(flow)
            while True:
                call = flow.send(await self.send(call))
        except StopIteration as done:
            result: T = done.value
            return result

    async def aclose(self) -> None:
        """Close the HTTP client if this transport made it."""
        if self._owns:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()
