"""``sandboxsec serve`` in a child process, for the tests that need real worker processes.

One way to start it, wait for ``/healthz``, read what it printed and stop it (the whole
process group, so no worker outlives a test), used by the CLI, revocation, replay and fault
tests alike; and one ``database_url`` fixture for the tests that let the server migrate an
empty database itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.pgcluster import PgCluster

__all__ = ["CLI", "Server", "bound_socket", "clean_env", "database_url", "empty_database",
           "free_port", "in_thread", "serving"]

#: The command line, as an operator runs it.
CLI = [sys.executable, "-m", "sandboxsec.cli"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bound_socket() -> tuple[socket.socket, int]:
    """A socket bound to a free port on 127.0.0.1 (held, so no other test takes the port
    before the server listens), and that port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


@contextlib.contextmanager
def in_thread(app: Any, sock: socket.socket, *, lifespan: str = "auto") -> Iterator[None]:
    """The ASGI ``app`` served by uvicorn on ``sock`` in a daemon thread of this process,
    for tests that need a real socket (raw HTTP, a browser) but not worker processes.
    Started before the block (or the test fails), stopped after it; the socket is closed."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "the in-process server did not start within 15 s"
        yield
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def clean_env(home: Path, db_url: str | None) -> dict[str, str]:
    """This process's environment without any ``SANDBOXSEC_`` setting, with ``home`` and,
    for a PostgreSQL URL, the database (SQLite: the embedded file under ``home``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOXSEC_")}
    env["SANDBOXSEC_HOME"] = str(home)
    if db_url and db_url.startswith("postgresql"):
        env["SANDBOXSEC_DATABASE_URL"] = db_url
    return env


class Server:
    """``sandboxsec serve [--workers N] [--migrate]`` in its own process group; its output goes
    to ``log``."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 2,
                 migrate: bool = True, extra_args: tuple[str, ...] = ()) -> None:
        self.env = env
        self.log = log
        self.workers = workers
        self.migrate = migrate
        self.extra_args = extra_args
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until ``/healthz`` answers 200 (a loaded machine starts slowly)."""
        args = ["serve", "--port", str(self.port), "--workers", str(self.workers)]
        if self.migrate:
            args.append("--migrate")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*CLI, *args, *self.extra_args], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start: {self.output()[-3000:]}")

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        """SIGKILL the whole group (supervisor and workers): nothing gets to clean up."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left after 20 s."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@contextlib.contextmanager
def serving(env: dict[str, str], log: Path, **kwargs: Any) -> Iterator[Server]:
    """A started :class:`Server`, stopped at the end of the block."""
    server = Server(env, log, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def empty_database(cluster: PgCluster | None, prefix: str) -> Iterator[str]:
    """An empty database on the suite's cluster, dropped at the end (skips the test when
    PostgreSQL is disabled)."""
    if cluster is None:
        pytest.skip("PostgreSQL disabled (SANDBOXSEC_TEST_NO_PG=1)")
    url = cluster.create_database(f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}")
    try:
        yield url
    finally:
        cluster.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the embedded SQLite file) or an empty PostgreSQL database the server migrates."""
    if request.param == "sqlite":
        yield None
        return
    with empty_database(request.getfixturevalue("pg_cluster"), "srv") as url:
        yield url
