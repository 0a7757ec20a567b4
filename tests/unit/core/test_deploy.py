"""The deployment files under deploy/: the systemd unit parses and keeps its hardening; the
Containerfile copies only what exists and runs unprivileged."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
UNIT = ROOT / "deploy" / "sandboxsec.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"


def _settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_keeps_its_hardening() -> None:
    s = _settings(UNIT.read_text())
    for key, want in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                      "ProtectHome": "yes", "PrivateTmp": "yes", "CapabilityBoundingSet": "",
                      "RestrictSUIDSGID": "yes", "UMask": "0077", "User": "sandboxsec",
                      "StateDirectoryMode": "0700"}.items():
        assert s.get(key) == [want], key
    assert "--host 127.0.0.1" in s["ExecStart"][0]  # TLS is terminated in front


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_parses(tmp_path: Path) -> None:
    # The unit as installed, with ExecStart pointing at a binary that exists here.
    unit = tmp_path / "sandboxsec.service"
    unit.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text()))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if str(unit.name) in line or "Unknown" in line]
    assert not problems, problems


def test_containerfile_copies_what_exists_and_runs_unprivileged() -> None:
    text = CONTAINERFILE.read_text()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in src.split():
            assert (ROOT / part).exists(), part
    assert re.search(r"^USER sandboxsec$", text, re.M)
    assert "SANDBOXSEC_HOME=/var/lib/sandboxsec" in text


def test_containerfile_installs_the_client_distribution_before_the_service() -> None:
    """The service depends on ``sandboxsec-client``, which is not on any index: the image
    build must install it from this repository first, or ``pip install .`` fails."""
    text = CONTAINERFILE.read_text()
    client = text.find("pip install --no-cache-dir ./clients/python")
    service = text.find("pip install --no-cache-dir .\n")
    assert 0 <= client < service, "the client must be installed before the service"
