"""``pip install ./clients/python`` in a fresh venv brings the client and nothing of the
service: an agent runtime or a payment system must not inherit FastAPI, psycopg, PKCS#11 or
libtss2 to talk to sandboxsec."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


# Runs in the fresh venv: installed distributions, and the requirement closure of the
# client's own dependencies (without extras), read from their metadata.
_PROBE = """
import importlib.metadata as m, importlib.util as u, json, re, sandboxsec_client
norm = lambda n: re.split(r"[\\s\\[<>=!~;(]", n, maxsplit=1)[0].lower().replace("_", "-")
seen, todo = set(), [norm(r) for r in m.requires("sandboxsec-client") if "extra" not in r]
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    try:
        todo += [norm(r) for r in (m.requires(name) or []) if "extra ==" not in r]
    except m.PackageNotFoundError:
        pass
print(json.dumps({
    "dists": sorted(norm(d.metadata["Name"]) for d in m.distributions()),
    "closure": sorted(seen),
    "server": u.find_spec("sandboxsec") is not None,
    "clients": sorted(n for n in dir(sandboxsec_client) if n.endswith("Client")),
}))
"""


def test_fresh_install_pulls_no_service_dependency(tmp_path: Path) -> None:
    service = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    client_deps = {_name(r) for r in client["dependencies"]}
    assert client_deps == {"httpx", "cryptography"}
    service_only = {_name(r) for r in service["dependencies"]} - client_deps
    service_only -= {"sandboxsec-client"}
    assert {"fastapi", "psycopg", "python-pkcs11", "tpm2-pytss", "mcp"} <= service_only

    venv = tmp_path / "venv"
    # A venv with nothing in it, not even pip: this process's pip installs into it
    # (``--python``), so what lands there is the client and what it pulls, and the run
    # skips bootstrapping a pip of its own (ensurepip cost as much as the install).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q",
                    "--disable-pip-version-check", str(ROOT / "clients" / "python")],
                   check=True, timeout=600, capture_output=True)
    out = json.loads(subprocess.run([py, "-c", _PROBE], check=True, capture_output=True,
                                     text=True, timeout=60, cwd=tmp_path).stdout)
    installed = set(out["dists"])
    assert "sandboxsec-client" in installed and client_deps <= installed
    # What httpx and cryptography need themselves (idna, anyio...) may also be a service
    # dependency; nothing else the service needs may come along.
    pulled = set(out["closure"])
    assert not (installed & service_only) - pulled, (installed & service_only) - pulled
    assert not installed - pulled - {"sandboxsec-client", "pip", "setuptools", "wheel"}
    assert not {"fastapi", "starlette", "uvicorn", "sqlalchemy", "psycopg", "python-pkcs11",
                "tpm2-pytss", "mcp", "pycasbin", "joserfc", "alembic"} & installed
    assert not out["server"]
    assert out["clients"] == ["AdminClient", "AgentClient", "ApproverClient",
                              "AsyncAdminClient", "AsyncAgentClient", "AsyncApproverClient",
                              "AsyncAuditorClient", "AsyncDownstreamClient", "AuditorClient",
                              "DownstreamClient"]
