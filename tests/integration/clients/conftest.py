"""A real ``sandboxsec serve`` per module and backend, and a sandbox that attests to it.

The sandbox is the software TPM of the unit tests (an AK certified by a test manufacturer CA,
quotes over the measured boot of ``faults_support``): every session these tests use was
started from an affirming attestation through the client, as a runtime would.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sandboxsec_client import AdminClient, AgentClient

from sandboxsec.sandbox import swtpm as sw
from tests.support.faults import (
    Deployment,
    Server,
    Tenant,
    Trust,
    running,
)
from tests.support.pgcluster import PgCluster
from tests.support.sessionkeys import KEYS, RegistryProof, SoftSessionKey, register
from tests.support.softtpm import (
    SoftAk,
    marshal_certify,
    marshal_quote,
    sign_quote,
    soft_activate,
    soft_session_key_public,
)

_counter = itertools.count()


class SoftSandbox:
    """The :class:`sandboxsec_client.SessionKeyAttester` of a sandbox with a software TPM
    (its session key is a software key registered for test proofs)."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self.soft = SoftAk()
        self.tick = 10_000
        self.session_key: SoftSessionKey | None = None
        self.session_key_public = b""

    def new_session_key(self) -> bytes:
        self.session_key = register()
        n = self.session_key.private.public_key().public_numbers()
        self.session_key_public = soft_session_key_public(n.x.to_bytes(32, "big"),
                                                          n.y.to_bytes(32, "big"))
        return self.session_key_public

    def certify_session_key(self, nonce: bytes) -> tuple[bytes, bytes]:
        certify = marshal_certify(nonce, self.session_key_public)
        return certify, sign_quote(self.soft, certify)

    def sign_session(self, message: bytes) -> bytes:
        assert self.session_key is not None
        return self.session_key.sign(message)


    def ak(self) -> bytes:
        return self.soft.public

    def ek_certificate(self) -> bytes:
        return self.trust.ek.der

    def ek_public(self) -> bytes | None:
        return None  # the service reads the EK's key from its certificate

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return soft_activate(self.trust.ek_key, self.soft.name, credential_blob,
                             encrypted_secret)

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        self.tick += 1
        q = marshal_quote(nonce, {"sha256": self.trust.pcrs}, clock=self.tick)
        return q, sign_quote(self.soft, q)

    def read_pcrs(self) -> dict[int, bytes]:
        return dict(self.trust.pcrs)

    def event_log(self) -> bytes | None:
        return self.trust.event_log


class SwtpmKeySandbox(SoftSandbox):
    """The sandbox whose session key lives in a real TPM (swtpm), made persistent at
    ``handle`` so another process (``sandboxsec gateway``) can sign with it; the AK that
    certifies it is the software one the service trusts."""

    HANDLE = 0x81000100

    def __init__(self, base: SoftSandbox, tpm: sw.SwTpm) -> None:
        super().__init__(base.trust)
        self.base, self.soft, self.tpm = base, base.soft, tpm  # the AK the service bound

    def quote(self, nonce: bytes) -> tuple[bytes, bytes]:
        return self.base.quote(nonce)  # one AK, one clock that only moves forward

    def new_session_key(self) -> bytes:
        from tpm2_pytss.constants import ESYS_TR

        public = self.tpm.new_session_key()
        with contextlib.suppress(Exception):  # a key of an earlier session, if any
            old = self.tpm.esapi.tr_from_tpmpublic(self.HANDLE)
            self.tpm.esapi.evict_control(ESYS_TR.OWNER, old, self.HANDLE)
        assert self.tpm.session_key_handle is not None
        self.tpm.esapi.evict_control(ESYS_TR.OWNER, self.tpm.session_key_handle, self.HANDLE)
        self.session_key, self.session_key_public = None, public
        return public

    def sign_session(self, message: bytes) -> bytes:
        return self.tpm.sign_session(message)


@dataclass
class Live:
    """A running service with two tenants and one bound sandbox for the first."""

    base: str
    deployment: Deployment
    server: Server
    tenant: Tenant
    other: Tenant
    sandbox: SoftSandbox
    #: The session :meth:`new_session` started last (what approval reads prove for).
    last_session: str | None = None

    def key(self, role: str) -> str:
        return self.tenant.keys[role]

    def proof(self, api_key: str | None) -> RegistryProof:
        """A ``proof=`` signer for a client with ``api_key``: proofs by the registered key
        of the session each request names."""
        return RegistryProof(api_key, lambda: datetime.now(UTC), self.last_session,
                             external_url=self.base)

    def prove(self, role: str) -> RegistryProof:
        """:meth:`proof` for this tenant's ``role`` key."""
        return self.proof(self.key(role))

    def new_session(self, sandbox: SoftSandbox | None = None) -> str:
        """A session started from a fresh affirming attestation through the client and its
        built-in prover, bound to a fresh session key certified by the sandbox's AK (the
        proofs of the session start are signed by that key, as a runtime's are)."""
        sandbox = sandbox or self.sandbox
        with AgentClient(self.base, self.key("agent")) as agent:
            verdict = agent.attest(sandbox, self.deployment.trust.manifest.encode())
            assert verdict.affirming, verdict.failures
            assert verdict.token is not None
            sid = agent.start_session(verdict.token).session_id
        if sandbox.session_key is not None:
            KEYS[sid] = sandbox.session_key
        self.last_session = sid
        return sid

    def sqlite_path(self) -> Path | None:
        return None if self.deployment.database_url else self.deployment.home / "sandboxsec.db"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """``sandboxsec serve`` (one worker) on SQLite or PostgreSQL, for the whole module."""
    url: str | None = None
    cluster: PgCluster | None = None
    if request.param == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
        if cluster is None:
            pytest.skip("PostgreSQL disabled (SANDBOXSEC_TEST_NO_PG=1)")
        url = cluster.create_database(f"live_{os.getpid()}_{next(_counter)}")
    # Short enough that a held lock turns into 503 quickly (the retry test uses it).
    fast = {"SANDBOXSEC_DB_TIMEOUT_SECONDS": "1", "SANDBOXSEC_AUDIT_WRITE_TIMEOUT_SECONDS": "2"}
    deployment = Deployment(tmp_path_factory.mktemp("live") / "home", url, extra_env=fast)
    try:
        tenant, other = deployment.create_tenants("client-bank", "other-bank")
        with running(deployment, workers=1) as server:
            sandbox = SoftSandbox(deployment.trust)
            with AgentClient(server.base, tenant.keys["agent"]) as agent:
                agent.bind_ak(sandbox)
            yield Live(server.base, deployment, server, tenant, other, sandbox)
    finally:
        if cluster is not None and url is not None:
            cluster.drop_database(url)


class SqliteWriteLock:
    """Another process holding SQLite's write lock (a backup, an operator's shell): every
    write of the service waits its database timeout and then answers 503."""

    def __init__(self, path: Path) -> None:
        self.conn: sqlite3.Connection | None = sqlite3.connect(path, timeout=10,
                                                               isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


class DroppingProxy:
    """A TCP forwarder in front of the service that can drop every open connection at once,
    as a NAT timeout or a load balancer restart does to a long-poll."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        #: Set whenever a request for an approval's ``/wait`` passes through.
        self.wait_seen = threading.Event()
        self.wait_requests = 0
        #: Cut the client off right after forwarding a POST (its answer is lost).
        self.drop_after_post = False
        self.posts = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, upstream]
            swallow = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, True, swallow),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False, swallow),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, inspect: bool,
              swallow: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if inspect and b"/wait?" in data:
                    with self._lock:
                        self.wait_requests += 1
                    self.wait_seen.set()
                if inspect and data.startswith(b"POST "):
                    with self._lock:
                        self.posts += 1
                    if self.drop_after_post:
                        swallow.set()
                if not inspect and swallow.is_set():
                    # The service answered; the client never hears it.
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_all(self) -> None:
        """Cut every connection open now (both sides see a reset)."""
        with self._lock:
            victims, self._open = self._open, []
        for s in victims:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.drop_all()


@pytest.fixture(scope="module")
def reads_allowed(live: Live) -> Live:
    with AdminClient(live.base, live.key("admin")) as admin:
        policy = admin.policy()
        if "mcp-read" not in policy.text:
            admin.replace_policy(policy.text + "\np, mcp-read, read, *, attested == true, allow\n",
                                 base_version=policy.version)
    return live


@pytest.fixture
def tpm_sandbox(live: Live, tmp_path: Path) -> Iterator[SwtpmKeySandbox]:
    """A sandbox whose session key is in a real TPM (swtpm), persistent for other processes.
    swtpm serves one connection at a time: the test lets go of its own before the gateway
    process connects (:func:`release_tpm`)."""
    if not sw.available():
        pytest.skip("swtpm is not installed")
    (tmp_path / "swtpm").mkdir()
    device = sw.start_swtpm(tmp_path / "swtpm")
    try:
        yield SwtpmKeySandbox(live.sandbox, device)
    finally:
        with contextlib.suppress(Exception):
            device.esapi.close()
        device.process.terminate()
        device.process.wait(timeout=10)


def release_tpm(sandbox: SwtpmKeySandbox) -> str:
    """Close this process's connection to the TPM; the TCTI another process connects with."""
    sandbox.tpm.esapi.close()
    return f"swtpm:host=127.0.0.1,port={sandbox.tpm.port}"
