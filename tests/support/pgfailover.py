"""A PostgreSQL 15 formation with automatic failover (pg_auto_failover), in a temp dir.

A monitor and two data nodes on loopback ports, each a ``pg_autoctl`` keeper in its own process
group (so :meth:`PgFormation.kill` of a node takes its keeper and its postgres down at once, as
a lost host would).  The standby takes part in the write quorum: the primary commits only once
the standby has the WAL (``synchronous_standby_names = 'ANY 1 (...)'``), which is what lets the
soak test require that no acknowledged write is lost when the primary dies.

The monitor's health-check and demotion timeouts are shortened (seconds, not the production
defaults of tens of seconds) so a failover fits in a test; docs/reliability.md says which
values an operator keeps in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.pgcluster import PG_BIN, _free_port

__all__ = ["PgFormation"]

#: Monitor settings (milliseconds) that make the failover take seconds.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": 1000,
    "pgautofailover.health_check_timeout": 1000,
    "pgautofailover.health_check_max_retries": 1,
    "pgautofailover.health_check_retry_delay": 500,
    "pgautofailover.node_considered_unhealthy_timeout": 3000,
    "pgautofailover.primary_demote_timeout": 3000,
}
#: Keeper settings (seconds); the partition timeout stays below the monitor's demote timeout
#: so an isolated primary demotes itself before the standby is promoted.
KEEPER_SETTINGS = {
    "timeout.network_partition_timeout": 2,
    "timeout.prepare_promotion_catchup": 5,
    "timeout.prepare_promotion_walreceiver": 1,
}
DBNAME = "sandboxsec"


class PgFormation:
    """``start()`` brings up monitor, primary and standby; ``url`` is the multi-host URL."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sandboxsec-pgaf-"))
        self.monitor_port = _free_port()
        self.ports = {"node1": _free_port(), "node2": _free_port()}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._as: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: the keepers run as the postgres system user.
            self._as = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.root, 0o777)
            shutil.chown(self.root, "postgres")
        self.env = {**os.environ, "XDG_CONFIG_HOME": str(self.root / "config"),
                    "XDG_DATA_HOME": str(self.root / "share"), "PG_CONFIG":
                    str(PG_BIN / "pg_config"), "PATH": f"{PG_BIN}:{os.environ['PATH']}"}

    # --- commands --------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120) -> str:
        out = subprocess.run([*self._as, "pg_autoctl", *args], env=self.env, cwd=self.root,
                             capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"pg_autoctl {args[0:2]} failed: {out.stderr[-3000:]}")
        return out.stdout

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([*self._as, "pg_autoctl", *args], env=self.env,
                                            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    @property
    def monitor_url(self) -> str:
        return (f"postgres://autoctl_node@127.0.0.1:{self.monitor_port}/pg_auto_failover"
                "?sslmode=disable")

    def _monitor_sql(self, sql: str) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.monitor_port} user=postgres "
                             "dbname=pg_auto_failover", autocommit=True) as conn:
            cur = conn.execute(sql)
            return list(cur.fetchall()) if cur.description else []

    # --- life cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> str:
        """Create and run the formation; wait for primary + secondary; return :attr:`url`."""
        common = ["--pgctl", str(PG_BIN / "pg_ctl"), "--hostname", "127.0.0.1",
                  "--auth", "trust", "--no-ssl"]
        self._run("create", "monitor", "--pgdata", str(self.root / "monitor"),
                  "--pgport", str(self.monitor_port), *common)
        self._spawn("monitor", "run", "--pgdata", str(self.root / "monitor"))
        self._wait(lambda: self._monitor_sql("SELECT 1") == [(1,)], timeout, "monitor up")
        for key, value in MONITOR_SETTINGS.items():
            self._monitor_sql(f"ALTER SYSTEM SET {key} = {value}")
        self._monitor_sql("SELECT pg_reload_conf()")
        for name in ("node1", "node2"):
            pgdata = str(self.root / name)
            self._run("create", "postgres", "--pgdata", pgdata, "--pgport",
                      str(self.ports[name]), "--name", name, "--dbname", DBNAME,
                      "--monitor", self.monitor_url, "--username", "postgres", *common,
                      timeout=timeout)
            for key, value in KEEPER_SETTINGS.items():
                self._run("config", "set", "--pgdata", pgdata, key, str(value))
            self._spawn(name, "run", "--pgdata", pgdata)
            want = {"node1": "single"} if name == "node1" else {"node1": "primary",
                                                                  "node2": "secondary"}
            self._wait(lambda want=want: self._settled(want), timeout, f"{name} joined")
        return self.url

    @property
    def url(self) -> str:
        """The URL a sandboxsec node is given: both hosts, only a read-write one is used."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports.values())
        return f"postgresql://postgres@{hosts}/{DBNAME}?target_session_attrs=read-write"

    def states(self) -> dict[str, tuple[str, str]]:
        """Node name -> (reported state, goal state), as the monitor sees them."""
        rows = self._monitor_sql("SELECT nodename, reportedstate, goalstate "
                                 "FROM pgautofailover.node")
        return {str(n): (str(r), str(g)) for n, r, g in rows}

    def _settled(self, want: dict[str, str]) -> bool:
        try:
            states = self.states()
        except Exception:
            return False
        return all(states.get(n) == (s, s) for n, s in want.items())

    def primary(self) -> str:
        """The node the monitor currently considers the writable one."""
        for name, (reported, goal) in self.states().items():
            if goal in ("primary", "wait_primary", "single") and reported == goal:
                return name
        raise RuntimeError(f"no primary: {self.states()}")

    def synchronous_standby_names(self, node: str) -> str:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.ports[node]} user=postgres "
                             f"dbname={DBNAME}", autocommit=True) as conn:
            row = conn.execute("SHOW synchronous_standby_names").fetchone()
            return str(row[0]) if row else ""

    def kill(self, name: str) -> None:
        """SIGKILL the node's keeper and its postgres (its whole process group)."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The postmaster may have left the keeper's group: kill it by its pid file too.
        pid_file = self.root / name / "postmaster.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def wait_primary(self, name: str, timeout: float = 120) -> None:
        """Wait until ``name`` accepts writes alone (``wait_primary``) or with a standby."""
        self._wait(lambda: self._writable(name), timeout, f"{name} promoted")

    def _writable(self, name: str) -> bool:
        try:
            return self.primary() == name
        except Exception:
            return False

    def _wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except Exception:  # not up yet: connection refused while a node starts
                pass
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                         for p in self.root.glob("*.log"))
        raise RuntimeError(f"timed out waiting for {what}: {self.states()}\n{logs}")

    def stop(self) -> None:
        """Stop every keeper (and its postgres) and delete the directory."""
        for name in list(self.procs):
            self.kill(name)
        for pid_file in self.root.glob("*/postmaster.pid"):
            with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def describe(self) -> str:
        return json.dumps(self.states())
