"""Optional webhook that tells the approver a request is waiting: HMAC-signed, retried.

Each delivery is an HTTP POST of a JSON body with two headers::

    X-Sandboxsec-Timestamp: <unix seconds>
    X-Sandboxsec-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>

A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares in constant
time and refuses timestamps older than a few minutes (:func:`verify_signature` does all three).
Deliveries run on a background thread so a slow receiver never delays an agent; a failed
delivery (network error, 408, 429 or 5xx) is retried with exponential backoff and jitter.
The webhook only notifies: approving still needs the approver's key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import structlog

from sandboxsec.encoding import ascii_int

__all__ = ["WebhookNotifier", "sign", "verify_signature"]

log = structlog.get_logger("sandboxsec.policy")

SIGNATURE_HEADER = "X-Sandboxsec-Signature"
TIMESTAMP_HEADER = "X-Sandboxsec-Timestamp"


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify_signature(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float,
    tolerance_seconds: int = 300,
) -> bool:
    """True when ``signature`` is ours for ``body`` and ``timestamp`` is recent."""
    try:
        sent = ascii_int(timestamp)  # str.isdigit() would pass "²", and int() then raise
    except ValueError:
        return False
    if abs(now - sent) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, sent, body), signature)


@dataclass(frozen=True, slots=True)
class _Delivery:
    body: bytes
    attempt: int = 0


class WebhookNotifier:
    """Delivers events to one URL on a background thread, retrying with backoff."""

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        max_attempts: int = 5,
        base_delay: float = 0.5,
        max_delay: float = 30.0,
        timeout: float = 5.0,
        now: Callable[[], float] = time.time,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._url = url
        self._secret = secret
        self._max_attempts = max_attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._now = now
        self._queue: queue.Queue[_Delivery | None] = queue.Queue(maxsize=10_000)
        self._stop = threading.Event()
        self._client = httpx.Client(timeout=timeout, transport=transport)
        self._thread = threading.Thread(target=self._run, name="approval-webhook", daemon=True)
        self._thread.start()
        #: counters for metrics and tests
        self.delivered = 0
        self.failed = 0

    def submit(self, event: Mapping[str, Any]) -> None:
        """Queue ``event`` for delivery; drops it (logged) when the queue is full."""
        body = json.dumps(event, sort_keys=True, separators=(",", ":")).encode("utf-8")
        try:
            self._queue.put_nowait(_Delivery(body))
        except queue.Full:
            log.warning("approval_webhook_dropped", reason="queue_full")

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._client.close()

    def _delay(self, attempt: int) -> float:
        # Full jitter: spreads retries of many requests after a receiver outage.
        ceiling = min(self._max_delay, self._base_delay * (2**attempt))
        return random.uniform(ceiling / 2, ceiling)

    def _send(self, body: bytes) -> str:
        timestamp = int(self._now())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
        }
        try:
            response = self._client.post(self._url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.info("approval_webhook_retry", error=type(exc).__name__)
            return "retry"
        if response.status_code < 300:
            return "ok"
        if response.status_code in (408, 429) or response.status_code >= 500:
            log.info("approval_webhook_retry", status=response.status_code)
            return "retry"
        # Other 4xx: the receiver refuses this request; retrying will not change its mind.
        log.warning("approval_webhook_refused", status=response.status_code)
        return "refused"

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            delivery = item
            while True:
                outcome = self._send(delivery.body)
                if outcome == "ok":
                    self.delivered += 1
                    break
                if outcome == "refused" or delivery.attempt + 1 >= self._max_attempts:
                    self.failed += 1
                    log.warning("approval_webhook_failed", attempts=delivery.attempt + 1)
                    break
                if self._stop.wait(self._delay(delivery.attempt)):
                    return
                delivery = _Delivery(delivery.body, delivery.attempt + 1)
