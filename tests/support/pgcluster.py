"""A throwaway PostgreSQL 15 cluster in a temp dir, for the test suite and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

PG_BIN = Path(os.environ.get("SANDBOXSEC_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """initdb + pg_ctl start on a free TCP port on 127.0.0.1; ``stop()`` removes everything."""

    def __init__(self, *, fsync: bool = False) -> None:
        """``fsync=False`` (the test suite) trades durability for speed; benches measuring
        PostgreSQL pass ``fsync=True`` so their figures are those of a real server."""
        self.durability = ("-c fsync=off -c full_page_writes=off" if not fsync
                           else "-c fsync=on -c full_page_writes=on -c synchronous_commit=on")
        self.root = Path(tempfile.mkdtemp(prefix="sandboxsec-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the server as the postgres system user.
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.root, 0o777)
            shutil.chown(self.root, "postgres")
        self.started = False
        self._admin_conn: psycopg.Connection[Any] | None = None
        self._admin_lock = threading.Lock()

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self._as, *cmd], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, cwd=self.root)

    def start(self) -> str:
        """Start the cluster and return a superuser URL (database ``postgres``)."""
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                f"{self.durability} -c max_connections=300 -c shared_buffers=128MB")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                  str(self.root / "log"), "-w", "-t", "60", "start")
        self.started = True
        return self.url("postgres")

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        """Run ``sql`` as the superuser on one connection kept for the cluster's life.

        Every PostgreSQL test creates and drops a database: a new engine and connection for
        each statement cost more than the statement.  A connection the server dropped (a
        fault test restarted it) is opened again once.
        """
        import psycopg

        with self._admin_lock:
            for attempt in (1, 2):
                if self._admin_conn is None or self._admin_conn.closed:
                    self._admin_conn = psycopg.connect(
                        host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                        autocommit=True)
                try:
                    self._admin_conn.execute(sql.encode())
                    return
                except psycopg.OperationalError:
                    self._close_admin()
                    if attempt == 2:
                        raise

    def _close_admin(self) -> None:
        """Close the kept superuser connection (it is opened again when next needed)."""
        conn, self._admin_conn = self._admin_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create database ``name`` (empty, or a copy of ``template``) and return its URL."""
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database, closing its connections first."""
        name = url_or_name.rsplit("/", 1)[-1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def pg_ctl(self, action: str) -> None:
        """``stop`` / ``start`` the server (for fault tests), data kept."""
        self._close_admin()
        if action == "stop":
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        else:
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                    f"{self.durability} -c max_connections=300")
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                      str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        """Stop the server and delete its directory."""
        self._close_admin()
        if self.started:
            try:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop")
            except subprocess.CalledProcessError:
                pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
