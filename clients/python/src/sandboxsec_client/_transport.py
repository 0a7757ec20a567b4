"""The two transports that drive flows: blocking (``httpx.Client``) and async
(``httpx.AsyncClient``).  All decisions are made by :class:`._core.Session`."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Self, TypeVar

import anyio
import httpx

from sandboxsec_client._core import (
    Answer,
    Call,
    Flow,
    ProofSigner,
    RetryPolicy,
    Session,
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
        while True:
            attempt += 1
            p = self._session.prepare(call)
            try:
                r = self._http.request(p.method, p.url, params=p.params, headers=p.headers,
                                       content=p.content, timeout=p.timeout)
                outcome = self._session.after_answer(call, _answer(r), attempt)
            except httpx.TransportError as exc:
                outcome = self._session.after_failure(call, exc, attempt,
                                                     sent=not isinstance(exc, _NOT_SENT))
            if isinstance(outcome, Answer):
                return outcome
            self._sleep(outcome)

    def run(self, flow: Flow[T]) -> T:
        """Drive one flow to its result."""
        return run_sync(flow, self.send)

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
        while True:
            attempt += 1
            p = self._session.prepare(call)
            try:
                r = await self._http.request(p.method, p.url, params=p.params,
                                             headers=p.headers, content=p.content,
                                             timeout=p.timeout)
                outcome = self._session.after_answer(call, _answer(r), attempt)
            except httpx.TransportError as exc:
                outcome = self._session.after_failure(call, exc, attempt,
                                                     sent=not isinstance(exc, _NOT_SENT))
            if isinstance(outcome, Answer):
                return outcome
            await anyio.sleep(outcome)

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
