"""ASGI middleware: request ids and log context, body size and JSON depth limits, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxsec.encoding import json_lone_surrogate

__all__ = ["Metrics", "RequestGuard"]


class Metrics:
    """Prometheus counters of one app (one registry per app, so tests do not share state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sandboxsec_http_requests_total", "HTTP requests", ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "sandboxsec_http_request_seconds", "HTTP request latency", ["route"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.audit_alarms = Gauge(
            "sandboxsec_audit_alarms", "Audit logs stopped by an integrity alarm", ["code"],
            registry=self.registry,
        )
        self.audit_alarm_codes: set[str] = set()


def _json_too_deep(body: bytes, limit: int) -> bool:
    # Cheap pre-check: a body can only nest deeper than the limit if it has that many openers.
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_str = False
    esc = False
    for ch in body:
        if in_str:
            if esc:
                esc = False
            elif ch == 0x5C:
                esc = True
            elif ch == 0x22:
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return False


_RECORD_PATH = re.compile(r"^/v1/sessions/[^/]+/trajectory$")


def _route_template(scope: Scope) -> str:
    # Label metrics by route template (bounded cardinality), never by the raw path with ids.
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    params = scope.get("path_params") or {}
    try:
        rendered = path.format(**params)
    except (KeyError, IndexError, ValueError):
        return path
    full = str(scope.get("path", ""))
    if rendered and full.endswith(rendered):
        return full[: len(full) - len(rendered)] + path
    return path


async def _send_error(send: Send, status: int, code: str, message: str, rid: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", rid.encode()), (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Binds a request id, enforces the body limit and JSON depth, records metrics.

    The body is read here (up to ``max_body``) and replayed to the app, so an oversized or
    too-deep request is refused before any handler or parser sees it.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_depth: int, metrics: Metrics,
                 record_body: int | None = None, body_timeout: float = 30.0) -> None:
        self.app = app
        self.body_timeout = body_timeout
        self.max_body = max_body
        # Trajectory uploads carry base64 records up to the record limit; only that route
        # gets the larger body limit.
        self.record_body = max(record_body or max_body, max_body)
        self.max_depth = max_depth
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if incoming.isalnum() and 8 <= len(incoming) <= 64 else secrets.token_hex(8)
        structlog.contextvars.bind_contextvars(request_id=rid)
        start = time.perf_counter()
        status_holder = {"status": 500}

        limit = self.max_body
        if scope["method"] == "POST" and _RECORD_PATH.match(scope.get("path", "")):
            limit = self.record_body
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await _send_error(send, 413, "payload_too_large",
                                      f"request bodies are limited to {limit} bytes", rid)
                    return
            except ValueError:
                await _send_error(send, 400, "invalid_input", "bad Content-Length", rid)
                return

        body_parts: list[bytes] = []
        size = 0
        more = scope["method"] in ("POST", "PUT", "PATCH", "DELETE")
        # A client that trickles its body holds a connection and a buffer: it gets the
        # request timeout for the whole body, then 408.
        deadline = time.monotonic() + self.body_timeout
        while more:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await _send_error(send, 408, "request_timeout",
                                  "the request body did not arrive in time", rid)
                return
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, 413, "payload_too_large",
                                  f"request bodies are limited to {limit} bytes", rid)
                return
            body_parts.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(body_parts)
        if body and _json_too_deep(body, self.max_depth):
            await _send_error(send, 400, "json_too_deep",
                              f"JSON nesting is limited to {self.max_depth} levels", rid)
            return
        if body and json_lone_surrogate(body):
            # Text that cannot be encoded as UTF-8 would fail deep inside a handler (a
            # database driver, a signature, a hash) as a 500: refuse it at the door.
            await _send_error(send, 400, "invalid_input",
                              "the body is not valid UTF-8 text (a lone surrogate)", rid)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                hdrs: list[Any] = list(message.get("headers", []))
                hdrs.append((b"x-request-id", rid.encode()))
                message["headers"] = hdrs
            await send(message)

        try:
            await self.app(scope, replay, send_wrapper)
        finally:
            template = _route_template(scope)
            self.metrics.requests.labels(scope["method"], template,
                                         str(status_holder["status"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
