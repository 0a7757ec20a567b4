"""ASGI middleware: request ids and log context, body limits (size, JSON depth, duplicate
member names), ``Cache-Control: no-store`` on every answer, metrics."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from typing import Any

import anyio
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandboxsec.api.gate import EXEMPT_PREFIXES, KeyGate, PersonGate, person_route
from sandboxsec.encoding import json_lone_surrogate
from sandboxsec.errors import SandboxSecError

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
        # Audit alarms are read at scrape time (sandboxsec.metrics.StateCollector): they live
        # in files every worker shares, so no per-process gauge.


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


class _DuplicateMember(ValueError):
    """Raised by the object hook on a repeated member name."""


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise _DuplicateMember
    return dict(pairs)


def _has_duplicate_member(body: bytes) -> bool:
    """True when a JSON body repeats a member name in some object.

    RFC 8259 leaves duplicates to the parser: Python keeps the last, other parsers the first,
    so a downstream could execute another amount than the one decided on.  Names are
    compared after unescaping (``"a"`` and ``"\\u0061"`` are one name).  A body that is not
    JSON is left to the route, which refuses it.
    """
    if b"{" not in body:
        return False
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except _DuplicateMember:
        return True
    except (ValueError, RecursionError):
        return False
    return False


_BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")
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


async def _send_error(send: Send, status: int, code: str, message: str, rid: str,
                      retry_after: int | None = None) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"cache-control", b"no-store"),
               (b"x-request-id", rid.encode()), (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """Binds a request id, enforces the body limit and JSON depth, records metrics.

    The body is read here (up to ``max_body``) and replayed to the app, so an oversized or
    too-deep request is refused before any handler or parser sees it.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, max_depth: int, metrics: Metrics,
                 record_body: int | None = None, body_timeout: float = 30.0,
                 gate: KeyGate | None = None, person_gate: PersonGate | None = None,
                 person_cookie: str = "") -> None:
        self.app = app
        self.gate = gate
        self.person_gate = person_gate
        self.person_cookie = person_cookie
        self.body_timeout = body_timeout
        self.max_body = max_body
        # Trajectory uploads carry base64 records up to the record limit; only that route
        # gets the larger body limit.
        self.record_body = max(record_body or max_body, max_body)
        self.max_depth = max_depth
        self.metrics = metrics

    async def _admit(self, scope: Scope, headers: dict[bytes, bytes], send: Send,
                     rid: str) -> int | None:
        """Check the key of a ``/v1`` request before its body: the status it was refused with
        (the answer is sent), or ``None``."""
        assert self.gate is not None
        path = str(scope.get("path", ""))
        auth = headers.get(b"authorization")
        has_body = scope["method"] in _BODY_METHODS
        if not path.startswith("/v1/") or path.startswith(EXEMPT_PREFIXES):
            return None
        client = scope.get("client")
        remote = str(client[0]) if client else None
        person = person_route(path) if self.person_gate is not None else None
        if person is not None:
            return await self._admit_person(scope, headers, send, rid, person, remote)
        if auth is None and not has_body:
            return None  # a public GET, or the route answers 401 itself
        try:
            token, principal = await anyio.to_thread.run_sync(
                self.gate.admit, (auth or b"").decode("latin-1"), remote)
        except SandboxSecError as exc:
            return await self._refuse(send, rid, exc)
        scope.setdefault("state", {})["principal"] = (token, principal)
        structlog.contextvars.bind_contextvars(
            tenant_id=principal.tenant_id, key_id=principal.key_id, role=str(principal.role))
        return None

    @staticmethod
    async def _refuse(send: Send, rid: str, exc: SandboxSecError) -> int:
        retry = getattr(exc, "retry_after", None)
        if exc.status == 503:
            retry = 1
        await _send_error(send, exc.status, exc.reason, exc.message, rid, retry)
        return exc.status

    async def _admit_person(self, scope: Scope, headers: dict[bytes, bytes], send: Send,
                            rid: str, route: tuple[str, str | None], remote: str | None
                            ) -> int | None:
        """The people's routes (no API key): their own checks, before the body."""
        assert self.person_gate is not None
        kind, token = route
        raw_origin = headers.get(b"origin")
        cookies = cookie_parser(headers.get(b"cookie", b"").decode("latin-1"))
        gate = self.person_gate
        try:
            person = await anyio.to_thread.run_sync(lambda: gate.admit(
                kind, token, has_body=scope["method"] in _BODY_METHODS,
                origin=None if raw_origin is None else raw_origin.decode("latin-1"),
                cookie=cookies.get(self.person_cookie), remote=remote))
        except SandboxSecError as exc:
            return await self._refuse(send, rid, exc)
        if person is not None:
            scope.setdefault("state", {})["person"] = person
        return None

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

        # The key first (api/gate.py): nobody without a valid key, or over its rate, gets a
        # body read, buffered and parsed.
        if self.gate is not None:
            refused = await self._admit(scope, headers, send, rid)
            if refused is not None:
                self.metrics.requests.labels(scope["method"], "key_gate", str(refused)).inc()
                return

        limit = self.max_body
        if scope["method"] == "POST" and _RECORD_PATH.match(scope.get("path", "")):
            limit = self.record_body
        elif self.person_gate is not None and person_route(str(scope.get("path", ""))):
            limit = min(limit, self.person_gate.max_body)
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
        more = scope["method"] in _BODY_METHODS
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
        # One place for every route: a body that repeats a member name is refused before any
        # handler parses it (each would keep the last value, a downstream maybe the first).
        if body and _has_duplicate_member(body):
            await _send_error(send, 400, "json_duplicate_key",
                              "a JSON object in the body repeats a member name", rid)
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
                # Answers carry grants, API keys, tokens and decrypted records: no cache (a
                # proxy's, the browser's) may keep one.  A route may set its own policy.
                if not any(name.lower() == b"cache-control" for name, _ in hdrs):
                    hdrs.append((b"cache-control", b"no-store"))
                message["headers"] = hdrs
            await send(message)

        try:
            await self.app(scope, replay, send_wrapper)
        finally:
            template = _route_template(scope)
            self.metrics.requests.labels(scope["method"], template,
                                         str(status_holder["status"])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
