"""The service's side of tlog-witness: submit each new checkpoint to the configured witnesses.

For every witness the publisher remembers the size it last cosigned per origin (starting at 0,
corrected by the witness's 409 answers), sends ``old <size>``, the consistency proof from that
size and the log-signed note, and keeps only cosignature lines that verify under the witness's
configured key.  Witnesses are called in parallel; a slow or absent witness delays nothing but
its own cosignature (checkpoints are published without it, verifiers decide the quorum).

A witness that answers 422 (the proof from what it cosigned does not verify) or a 409 that is
not a size (a second root for a size it holds) has seen a different past of this log: that is
an alarm, reported through ``on_refused``, never retried blindly.
"""

from __future__ import annotations

import base64
import http.client
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import structlog

from sandboxsec.audit.checkpoint import Checkpoint
from sandboxsec.audit.cosignature import (
    Cosignature,
    WitnessKey,
    signature_lines,
    verify_cosignatures,
)
from sandboxsec.audit.errors import AuditVerificationError

__all__ = ["WitnessEndpoint", "WitnessPublisher"]

_log = structlog.get_logger("sandboxsec.audit.witness")

#: Times a submission follows a witness's 409 size before giving up for this round.
_MAX_RETRIES = 3
#: An unchanged checkpoint is resubmitted this often, so cosignature timestamps stay fresh
#: (a verifier can then tell a quiet log from a frozen one).
REFRESH_SECONDS = 300.0

ProofFn = Callable[[str, int, int], list[bytes]]
CosignedFn = Callable[[str, int, list[Cosignature]], None]
RefusedFn = Callable[[str, str, str], None]


@dataclass(frozen=True, slots=True)
class WitnessEndpoint:
    """One configured witness: its submission URL (``.../add-checkpoint``) and its key."""

    url: str
    key: WitnessKey


#: The most of a witness's answer that is read (a cosignature line is about 150 bytes).
_MAX_ANSWER_BYTES = 64 * 1024


class _Answer:
    """A witness's HTTP answer: status, content type and (bounded) text."""

    __slots__ = ("ctype", "status", "text")

    def __init__(self, status: int, ctype: str, text: str) -> None:
        self.status = status
        self.ctype = ctype
        self.text = text


class _DirectHTTP:
    """Keep-alive HTTP/1.1 connections to one witness, on the standard library.

    The same requests the general client sends, with the same TLS trust (httpx's own context:
    its CA bundle, ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), for a fraction of its CPU per request;
    every checkpoint makes one request per witness while the log's writer competes for the
    same interpreter.  Used only when no proxy is configured in the environment (the general
    client honours those).  A connection is used by one request at a time.
    """

    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if u.username is not None or u.password is not None:
            # Credentials in the URL: the general client sends them (as Basic auth).
            raise ValueError("a witness URL with credentials")
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._timeout = timeout
        self._ssl = httpx.create_ssl_context() if self._https else None
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._lock = threading.Lock()

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def post(self, body: bytes) -> _Answer:
        """POST ``body``; raises ``OSError`` / ``http.client.HTTPException`` when unreachable."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        try:
            try:
                answer = self._exchange(conn, body)
            except (ConnectionError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine):
                if not reused:
                    raise
                # The witness closed the kept-alive connection meanwhile: once more on a new
                # one (add-checkpoint may be repeated: a witness that already took it answers
                # 409 with its size, or cosigns the same tree again).
                conn.close()
                conn = self._connect()
                answer = self._exchange(conn, body)
        except BaseException:
            conn.close()
            raise
        return answer

    def _exchange(self, conn: http.client.HTTPConnection, body: bytes) -> _Answer:
        conn.request("POST", self._path, body=body,
                     headers={"Content-Type": "text/plain; charset=utf-8"})
        r = conn.getresponse()
        data = r.read(_MAX_ANSWER_BYTES + 1)
        if len(data) > _MAX_ANSWER_BYTES or r.will_close or not r.isclosed():
            conn.close()  # the witness closes it, or the body was not read to its end
        else:
            with self._lock:
                keep = not self._closed
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()
        return _Answer(r.status, r.getheader("content-type", "") or "",
                       data[:_MAX_ANSWER_BYTES].decode("utf-8", "replace"))

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _proxied() -> bool:
    """Whether the environment configures an HTTP proxy (the general client then goes)."""
    proxies = urllib.request.getproxies()
    return any(proxies.get(k) for k in ("http", "https", "all"))


class _ProofMemo:
    """The consistency proofs of one submission, made once per starting size.

    Witnesses that cosigned the same size (the usual case) need the same proof: the first
    caller makes it (from the writer's kept leaves, or the store), the others wait for it and
    reuse it.
    """

    def __init__(self, make: Callable[[int], list[bytes]]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._made: dict[int, list[bytes]] = {}

    def get(self, old: int) -> list[bytes]:
        with self._lock:
            proof = self._made.get(old)
            if proof is None:
                proof = self._made[old] = self._make(old)
            return proof


class WitnessPublisher:
    """Submits checkpoints to witnesses, now (:meth:`submit`) or in the background
    (:meth:`submit_later`, which keeps only the newest pending checkpoint per log)."""

    def __init__(
        self,
        endpoints: Sequence[WitnessEndpoint],
        *,
        timeout: float,
        proof: ProofFn,
        on_cosigned: CosignedFn,
        on_refused: RefusedFn,
        newest: Callable[[str], int],
    ) -> None:
        self.endpoints = list(endpoints)
        self._newest = newest
        self._timeout = timeout
        self._proof = proof
        self._on_cosigned = on_cosigned
        self._on_refused = on_refused
        self._sizes: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pending: dict[str, tuple[str, Checkpoint]] = {}
        self._submitted: dict[str, tuple[float, str, Checkpoint]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._client = httpx.Client(timeout=timeout)
        self._direct: dict[str, _DirectHTTP] = {}
        if not _proxied():
            for ep in self.endpoints:
                try:
                    self._direct[ep.url] = _DirectHTTP(ep.url, timeout)
                except (ValueError, ssl.SSLError, OSError):
                    pass  # the general client answers (and reports) for that one
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, len(self.endpoints)), thread_name_prefix="sandboxsec-witness"
        )

    def submit(self, log_id: str, note: str, checkpoint: Checkpoint) -> list[Cosignature]:
        """Submit to every witness in parallel; the cosignatures that verified."""
        if not self.endpoints:
            return []
        proofs = _ProofMemo(lambda old: self._proof(log_id, old, checkpoint.size))
        futures = [
            self._pool.submit(self._one, ep, log_id, note, checkpoint, proofs)
            for ep in self.endpoints
        ]
        got = [c for f in futures if (c := f.result()) is not None]
        with self._lock:
            last = self._submitted.get(log_id)
            if last is None or last[2].size <= checkpoint.size:
                self._submitted[log_id] = (time.monotonic(), note, checkpoint)
        if got:
            self._on_cosigned(log_id, checkpoint.size, got)
        return got

    def refresh(self, every: float = REFRESH_SECONDS) -> int:
        """Queue again every checkpoint this process last submitted more than ``every``
        seconds ago (bounded: one per log per period).  Returns how many were queued."""
        now = time.monotonic()
        with self._lock:
            stale = [(log_id, note, cp) for log_id, (at, note, cp) in self._submitted.items()
                     if now - at >= every]
        for log_id, note, cp in stale:
            self.submit_later(log_id, note, cp)
        return len(stale)

    def submit_later(self, log_id: str, note: str, checkpoint: Checkpoint) -> None:
        """Queue ``checkpoint`` for the background submitter (newest per log wins)."""
        if not self.endpoints:
            return
        with self._cv:
            if self._stopping:
                return
            current = self._pending.get(log_id)
            if current is None or current[1].size <= checkpoint.size:
                self._pending[log_id] = (note, checkpoint)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="sandboxsec-witness-publisher", daemon=True
                )
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                batch, self._pending = self._pending, {}
            for log_id, (note, cp) in batch.items():
                try:
                    self.submit(log_id, note, cp)
                except Exception as exc:  # the publisher must outlive any one failure
                    _log.warning("witness_submit_failed", log_id=log_id, error=type(exc).__name__)

    def close(self) -> None:
        """Stop the background submitter and close connections."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=self._timeout + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        for direct in self._direct.values():
            direct.close()

    # ------------------------------------------------------------------------ one witness

    def _one(
        self, ep: WitnessEndpoint, log_id: str, note: str, cp: Checkpoint, proofs: _ProofMemo
    ) -> Cosignature | None:
        key = (ep.url, cp.origin)
        with self._lock:
            old = self._sizes.get(key, 0)
        for _ in range(_MAX_RETRIES):
            if old > cp.size:
                # The witness already cosigned a larger tree: normal when another worker
                # published it, a rollback when the log itself no longer reaches that size.
                if self._newest(log_id) < old:
                    self._on_refused(
                        log_id, ep.key.name,
                        f"witness {ep.key.name} holds size {old}, the log only {cp.size}: "
                        "the log was rolled back",
                    )
                return None
            try:
                proof = [] if old in (0, cp.size) else proofs.get(old)
            except Exception as exc:  # the stored tree cannot give the proof: log and skip
                _log.warning("witness_proof_unavailable", log_id=log_id, witness=ep.key.name,
                             error=type(exc).__name__)
                return None
            body = f"old {old}\n" + "".join(
                base64.b64encode(h).decode() + "\n" for h in proof
            ) + "\n" + note
            try:
                r = self._post(ep, body.encode("utf-8"))
            except (httpx.HTTPError, OSError, http.client.HTTPException) as exc:
                _log.warning("witness_unreachable", witness=ep.key.name, error=type(exc).__name__)
                return None
            ctype = r.ctype
            if r.status == 200:
                return self._accept(ep, key, log_id, cp, r.text)
            if r.status == 409 and ctype.startswith("text/x.tlog.size"):
                held = r.text.strip()
                if not held.isdigit():
                    break
                old = int(held)
                with self._lock:
                    self._sizes[key] = old
                continue
            if r.status in (409, 422):
                self._on_refused(
                    log_id,
                    ep.key.name,
                    f"witness {ep.key.name} refused size {cp.size} with {r.status}: "
                    f"{r.text.strip()[:200]}",
                )
                return None
            _log.warning("witness_rejected", witness=ep.key.name, status=r.status,
                         log_id=log_id)
            return None
        _log.warning("witness_retries_exhausted", witness=ep.key.name, log_id=log_id)
        return None

    def _post(self, ep: WitnessEndpoint, body: bytes) -> _Answer:
        direct = self._direct.get(ep.url)
        if direct is not None:
            return direct.post(body)
        r = self._client.post(ep.url, content=body,
                              headers={"Content-Type": "text/plain; charset=utf-8"})
        return _Answer(r.status_code, r.headers.get("content-type", ""), r.text)

    def _accept(
        self, ep: WitnessEndpoint, key: tuple[str, str], log_id: str, cp: Checkpoint, text: str
    ) -> Cosignature | None:
        try:
            found = verify_cosignatures(cp, signature_lines(text), [ep.key])
        except AuditVerificationError as exc:
            _log.warning("witness_cosignature_invalid", witness=ep.key.name, code=exc.reason)
            return None
        if not found:
            _log.warning("witness_cosignature_missing", witness=ep.key.name, log_id=log_id)
            return None
        with self._lock:
            if self._sizes.get(key, 0) < cp.size:
                self._sizes[key] = cp.size
        return found[0]
