"""The HTTP/1.1 connection protocol the server runs: uvicorn's httptools protocol, bounded.

uvicorn's httptools protocol accepts request heads of any size and waits for them forever, so
one client can hold memory and a connection slot without limit.  This subclass refuses heads
over ``MAX_HEAD_BYTES`` (431 ``headers_too_large``) and closes connections whose head has not
arrived within the request timeout (408 ``request_timeout``); bodies are bounded by the
ASGI middleware (:mod:`sandboxsec.api.middleware`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from sandboxsec.settings import Settings

__all__ = ["MAX_HEAD_BYTES", "GuardedHttpToolsProtocol"]

#: The largest request line plus headers accepted, in bytes.
MAX_HEAD_BYTES = 64 * 1024


class _HeadTooLarge(Exception):
    """Raised inside a parser callback to stop parsing an oversized head."""


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """httptools protocol with a head size limit and a head read timeout."""

    head_timeout: float | None = None  # seconds; read from the settings on first use

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        if GuardedHttpToolsProtocol.head_timeout is None:
            GuardedHttpToolsProtocol.head_timeout = Settings().request_timeout_seconds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # a client that connects and sends nothing is cut off too

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(
            self.head_timeout or 30.0, self._head_expired
        )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_error_response(
                408, "Request Timeout", "request_timeout",
                "the request head did not arrive in time"))
            self.transport.close()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            self._head_too_large = True
            raise _HeadTooLarge

    # parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the next request on a kept-alive connection
            self._start_head_timer()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # A callback error surfaces from the parser as a 400; an oversized head is a 431.
        if self._head_too_large:
            self._cancel_head_timer()
            self.transport.write(_error_response(
                431, "Request Header Fields Too Large", "headers_too_large",
                f"request heads are limited to {MAX_HEAD_BYTES} bytes"))
            self.transport.close()
            return
        super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
