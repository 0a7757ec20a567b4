"""The operator's command line: migrations on purpose, one configuration, clear failures."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sandboxsec import __version__
from sandboxsec.cli import main
from tests.support.pgcluster import PgCluster
from tests.support.serve import CLI as SANDBOXSEC
from tests.support.serve import clean_env as _env
from tests.support.serve import free_port as _free_port

_LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[")


class _Cli:
    """Runs ``sandboxsec`` in this process (a subprocess costs seconds of imports each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> None:
        self.mp, self.capsys = monkeypatch, capsys

    def __call__(self, env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
        for name in list(os.environ):
            if name.startswith("SANDBOXSEC_"):
                self.mp.delenv(name)
        for name, value in env.items():
            if name.startswith("SANDBOXSEC_"):
                self.mp.setenv(name, value)
        if stdin is not None:
            self.mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        self.capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse: --version, usage errors
            code = int(exc.code or 0)
        out = self.capsys.readouterr()
        # Log lines of background threads (the audit checkpoint sweeper) are not the output.
        stdout = "".join(line for line in out.out.splitlines(keepends=True)
                         if not _LOG_LINE.match(line))
        return SimpleNamespace(returncode=code, stdout=stdout, stderr=out.err)


@pytest.fixture
def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> _Cli:
    return _Cli(monkeypatch, capsys)


def _subprocess(env: dict[str, str], *args: str) -> Any:
    return subprocess.run([*SANDBOXSEC, *args], env=env, capture_output=True, text=True,
                          timeout=300)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")) if root.exists() else []


def test_version(tmp_path: Path, _run: _Cli) -> None:
    r = _run(_env(tmp_path, None), "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sandboxsec {__version__}"


def test_commands_never_create_a_database(tmp_path: Path, _run: _Cli) -> None:
    """Run with the wrong settings, a command says so and creates nothing (it used to create
    an empty database and print keys the server would reject)."""
    home = tmp_path / "not-the-servers-home"
    env = _env(home, None)
    for args in (("tenant", "create", "acme"), ("apikey", "list", "--tenant", "acme"),
                 ("policy", "get", "--tenant", "acme"), ("migrate", "--check")):
        r = _run(env, *args)
        assert r.returncode == 5, (args, r.stderr)
        assert "database_missing" in r.stderr and str(home / "sandboxsec.db") in r.stderr
        assert "Traceback" not in r.stderr and r.stdout == ""
    assert not home.exists()
    # An explicitly configured SQLite file that does not exist: the same.
    env["SANDBOXSEC_DATABASE_URL"] = f"sqlite:///{tmp_path / 'db' / 'x.db'}"
    r = _run(env, "tenant", "list")
    assert r.returncode == 5 and "database_missing" in r.stderr
    assert _files(tmp_path) == []


def test_bad_settings_are_one_line_not_a_traceback(tmp_path: Path, _run: _Cli) -> None:
    env = _env(tmp_path, None)
    for name, value, fragment, args in (
        ("SANDBOXSEC_DB_POOL_SIZE", "lots", "SANDBOXSEC_DB_POOL_SIZE", ("tenant", "list")),
        ("SANDBOXSEC_DATABASE_URL", "mysql://root:hunter2@db/x", "unsupported database URL",
         ("serve", "--port", "1")),
        ("SANDBOXSEC_DATABASE_URL", "hunter2", "unsupported database URL", ("migrate",)),
        ("SANDBOXSEC_KEY_PROVIDER", "vault", "SANDBOXSEC_KEY_PROVIDER", ("tenant", "list")),
    ):
        r = _run({**env, name: value}, *args)
        assert r.returncode == 3, (name, args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid_setting: "), lines
        assert fragment in lines[0] and "hunter2" not in r.stderr
    assert _files(tmp_path) == []


def test_unreachable_database_exits_with_its_own_code(tmp_path: Path, _run: _Cli) -> None:
    env = {**_env(tmp_path, None), "SANDBOXSEC_DB_TIMEOUT_SECONDS": "1",
           "SANDBOXSEC_DATABASE_URL": f"postgresql://u:hunter2@127.0.0.1:{_free_port()}/x"}
    for args in (("tenant", "list"), ("serve", "--port", str(_free_port()))):
        r = _run(env, *args)
        assert r.returncode == 4, (args, r.stderr)
        assert "database_unavailable" in r.stderr and "Traceback" not in r.stderr
        assert "hunter2" not in r.stderr
        assert "PostgreSQL postgresql://u:***@127.0.0.1" in r.stderr  # which database


def test_operator_toolkit_on_a_migrated_database(tmp_path: Path, _run: _Cli) -> None:
    db = tmp_path / "data" / "sandboxsec.db"
    env = {**_env(tmp_path / "home", None), "SANDBOXSEC_DATABASE_URL": f"sqlite:///{db}"}
    m = _run(env, "migrate")
    assert m.returncode == 0, m.stderr
    assert json.loads(m.stdout)["up_to_date"] is True
    assert f"database SQLite {db} (SANDBOXSEC_DATABASE_URL)" in m.stderr
    created = json.loads(_run(env, "tenant", "create", "acme").stdout)
    listed = json.loads(_run(env, "tenant", "list", "-o", "json").stdout)
    assert [t["name"] for t in listed] == ["acme"]
    table = _run(env, "tenant", "list").stdout
    assert table.splitlines()[0].split() == ["TENANT_ID", "NAME", "CREATED_AT"]
    assert table.splitlines()[1].split()[:2] == [created["tenant_id"], "acme"]
    # A label that does not display as itself is written out, not sent to the terminal.
    _run(env, "tenant", "key", "acme", "--role", "agent", "--label", "ops\u202ekey\x1b[2J")
    table = _run(env, "apikey", "list", "--tenant", "acme").stdout
    assert "ops<U+202E>key<U+001B>[2J" in table and "\u202e" not in table

    keys = json.loads(_run(env, "apikey", "list", "--tenant", "acme", "-o", "json").stdout)
    assert {k["role"] for k in keys} == {"admin", "agent", "approver", "auditor"}
    assert len(keys) == 5
    assert all("key" not in k for k in keys)
    agent_id = created["key_ids"]["agent"]
    r = _run(env, "apikey", "revoke", "--tenant", "acme", agent_id)
    assert r.returncode == 0 and json.loads(r.stdout)["revoked"] is True
    keys = json.loads(_run(env, "apikey", "list", "--tenant", created["tenant_id"],
                           "-o", "json").stdout)
    assert [k["revoked_at"] is not None for k in keys if k["key_id"] == agent_id] == [True]
    missing = _run(env, "apikey", "revoke", "--tenant", "acme", "0" * 16)
    assert missing.returncode == 2 and "not_found" in missing.stderr

    policy = "p, pay, payment, *, amount < 100, allow\n"
    put = _run(env, "policy", "put", "--tenant", "acme", "-", stdin=policy)
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["version"] == 1
    assert _run(env, "policy", "get", "--tenant", "acme").stdout == policy
    got = json.loads(_run(env, "policy", "get", "--tenant", "acme", "-o", "json").stdout)
    assert got["version"] == 1 and got["updated_by"] == "operator"
    bad = _run(env, "policy", "put", "--tenant", "acme", "-",
               stdin="p, pay, payment, *, true, allow\r\n")
    assert bad.returncode == 2 and "policy_invalid" in bad.stderr and "line 1" in bad.stderr
    stale = _run(env, "policy", "put", "--tenant", "acme", "--base-version", "0", "-",
                 stdin=policy)
    assert stale.returncode == 2 and "policy_version_conflict" in stale.stderr


def test_stale_schema_is_refused_until_migrated(tmp_path: Path, _run: _Cli) -> None:
    db = tmp_path / "sandboxsec.db"
    env = {**_env(tmp_path / "home", None), "SANDBOXSEC_DATABASE_URL": f"sqlite:///{db}"}
    assert _run(env, "migrate").returncode == 0
    assert _run(env, "tenant", "create", "acme").returncode == 0
    with sqlite3.connect(db) as conn:  # as if made by an older version
        conn.execute("DELETE FROM alembic_version")
    for args in (("migrate", "--check"), ("serve", "--port", str(_free_port()))):
        r = _run(env, *args)
        assert r.returncode == 5, (args, r.stderr)
        assert "schema_not_current" in r.stderr and "sandboxsec migrate" in r.stderr
    with sqlite3.connect(db) as conn:  # a version newer than this one
        conn.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    r = _run(env, "tenant", "list")
    assert r.returncode == 5 and "newer than this version" in r.stderr


def test_two_nodes_migrate_one_postgres_at_once(pg_cluster: PgCluster | None,
                                                tmp_path: Path) -> None:
    if pg_cluster is None:
        pytest.skip("PostgreSQL disabled")
    url = pg_cluster.create_database(f"mig_{os.getpid()}_{_free_port()}")
    env = _env(tmp_path, url)
    try:
        barrier = threading.Barrier(2)
        results: list[Any] = []

        def node() -> None:
            barrier.wait()
            results.append(_subprocess(env, "migrate"))

        threads = [threading.Thread(target=node) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        assert all(json.loads(r.stdout)["up_to_date"] for r in results)
        assert _subprocess(env, "migrate", "--check").returncode == 0
    finally:
        pg_cluster.drop_database(url)


def test_unusable_key_provider_stops_serve_with_the_dependency_code(tmp_path: Path,
                                                                   _run: _Cli) -> None:
    """An HSM the server cannot open at all is a failed dependency (exit 4, one line), like an
    unreachable database: not a server that starts and answers 503 to everything, and not the
    usage code."""
    env = {**_env(tmp_path, None), "SANDBOXSEC_KEY_PROVIDER": "pkcs11",
           "SANDBOXSEC_PKCS11_MODULE": str(tmp_path / "no-such-module.so"),
           "SANDBOXSEC_PKCS11_TOKEN_LABEL": "sandboxsec", "SANDBOXSEC_PKCS11_PIN": "hunter2"}
    r = _run(env, "serve", "--port", str(_free_port()))
    assert r.returncode == 4, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and errors[0].startswith("error: key_provider_unavailable: "), r.stderr
    assert "Traceback" not in r.stderr and "hunter2" not in r.stderr
