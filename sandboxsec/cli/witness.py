"""``sandboxsec witness``: a C2SP tlog-witness run by a party independent of the service.

``serve`` answers ``POST <prefix>/add-checkpoint`` (c2sp.org/tlog-witness) with its own key and
state under ``--home`` (both 0600); ``public-key`` prints the witness's verifier key, which the
service's operator (``SANDBOXSEC_AUDIT_WITNESSES``) and auditors (``audit verify --witness``)
configure.  The witness needs no database and never talks to the service: the service calls it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sandboxsec.audit.cosignature import WitnessKey
from sandboxsec.audit.errors import WitnessSizeConflictError
from sandboxsec.audit.keys import load_public_key
from sandboxsec.audit.witness import MAX_BODY_BYTES, FileWitnessStore, TrustedLog, Witness
from sandboxsec.errors import SandboxSecError
from sandboxsec.statefiles import create_once

__all__ = ["load_witness_key", "register", "trusted_log"]

_log = structlog.get_logger("sandboxsec.witness")


def register(subs: Any) -> None:
    """Add ``witness serve`` and ``witness public-key``."""
    p = subs.add_parser("witness", help="a C2SP tlog-witness that cosigns consistent checkpoints")
    w = p.add_subparsers(dest="witness_command", metavar="SUBCOMMAND")
    w.required = True

    s = w.add_parser("serve", help="serve add-checkpoint over HTTP")
    _common(s)
    s.add_argument("--log-key", action="append", required=True, metavar="VKEY",
                   help="a log's checkpoint verifier key name+id+base64 (or a file holding it, "
                   "or a PEM key with --log-name); repeatable")
    s.add_argument("--log-name", help="the key name of a PEM --log-key")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7380)
    s.add_argument("--prefix", default="", help="the submission URL prefix (default: none)")
    s.set_defaults(handler=_serve)

    k = w.add_parser("public-key", help="print the witness verifier key (creates the key)")
    _common(k)
    k.set_defaults(handler=_public_key)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", type=Path, required=True, help="the witness's own state directory")
    p.add_argument("--name", required=True, help="the witness name, e.g. witness.example.org/w1")


def load_witness_key(home: Path) -> Ed25519PrivateKey:
    """The witness's Ed25519 key under ``home`` (created once, 0600)."""
    pem = create_once(
        home / "witness_key.pem",
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{home / 'witness_key.pem'} is not an Ed25519 key")
    return key


def trusted_log(text: str, pem_name: str | None = None) -> TrustedLog:
    """A trusted log from a verifier key string, a file holding one, or a PEM key file."""
    path = Path(text)
    data = path.read_bytes() if "+" not in text and path.exists() else text.encode()
    key = load_public_key(data)
    if data.strip().startswith(b"-----BEGIN"):
        if not pem_name:
            raise ValueError("a PEM log key needs --log-name")
        name = pem_name
    else:
        name = data.decode().strip().split("+", 1)[0]
    return TrustedLog(name, key, name + "/")


def _public_key(args: argparse.Namespace) -> int:
    args.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = load_witness_key(args.home)
    sys.stdout.write(WitnessKey.from_private(args.name, key).vkey() + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    args.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        logs = [trusted_log(k, args.log_name) for k in args.log_key]
    except (OSError, ValueError) as exc:
        print(f"error: a --log-key is not usable: {exc}", file=sys.stderr)
        return 2
    witness = Witness(
        name=args.name,
        private_key=load_witness_key(args.home),
        logs=logs,
        store=FileWitnessStore(args.home / "witness_state.json"),
        now=lambda: int(time.time()),
    )
    path = args.prefix.rstrip("/") + "/add-checkpoint"
    server = ThreadingHTTPServer((args.host, args.port), _handler(witness, path))
    server.daemon_threads = True
    # shutdown() waits for serve_forever() to return, so it must run on another thread.
    signal.signal(signal.SIGTERM,
                  lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    host, port = server.server_address[:2]
    # The first line on stdout says where it listens (a test or supervisor may read it).
    print(f"witness {witness.key.vkey()} listening on http://{host!s}:{port}{path}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _handler(witness: Witness, path: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "sandboxsec-witness"
        # A client that stalls mid-request is dropped instead of holding a thread forever.
        timeout = 15
        # An answer is written as headers then body: with Nagle's algorithm the body waited
        # for the client's delayed acknowledgement of the headers, about 40 ms per request on
        # a kept-alive connection.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            return  # requests are logged below, structured

        def _answer(self, status: int, body: str, ctype: str = "text/plain; charset=utf-8") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(404 if self.path != "/healthz" else 200, "ok\n")

        def do_POST(self) -> None:
            if self.path != path:
                self._answer(404, "not found\n")
                return
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self.close_connection = True
                self._answer(400, "a Content-Length up to 64 KiB is required\n")
                return
            body = self.rfile.read(length)
            try:
                line = witness.add_checkpoint(body)
            except WitnessSizeConflictError as exc:
                _log.info("witness_refused", code=exc.reason, held=exc.size)
                self._answer(409, f"{exc.size}\n", "text/x.tlog.size")
                return
            except SandboxSecError as exc:
                # A refused proof may be evidence of a misbehaving log: it is logged.
                _log.warning("witness_refused", code=exc.reason, message=exc.message)
                self._answer(exc.status, f"{exc.reason}: {exc.message}\n")
                return
            _log.info("witness_cosigned")
            self._answer(200, line)

    return Handler
