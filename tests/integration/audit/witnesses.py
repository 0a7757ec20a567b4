"""Witnesses as separate processes (``sandboxsec witness serve``), as an independent party runs
them: own home, own key, own state file; the service only knows their URL and public key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class WitnessProcess:
    name: str
    home: Path
    url: str
    vkey: str
    proc: subprocess.Popen[str]


def start_witness(home: Path, name: str, log_vkey: str, port: int = 0) -> WitnessProcess:
    """Start one witness and wait for the line saying where it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxsec.cli", "witness", "serve", "--home", str(home),
         "--name", name, "--log-key", log_vkey, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("witness "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"witness did not start: {line!r} {err[-2000:]}")
    _, vkey, _, _, url = line.split()
    return WitnessProcess(name, home, url, vkey, proc)


def stop_witness(w: WitnessProcess) -> None:
    if w.proc.poll() is None:
        w.proc.send_signal(signal.SIGTERM)
        try:
            w.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait(timeout=10)
    for stream in (w.proc.stdout, w.proc.stderr):
        if stream is not None:
            stream.close()


@contextmanager
def witnesses(tmp: Path, log_vkey: str, n: int = 2) -> Iterator[list[WitnessProcess]]:
    """``n`` witness processes trusting the log key ``log_vkey``."""
    started: list[WitnessProcess] = []
    try:
        for i in range(n):
            started.append(start_witness(tmp / f"witness{i}", f"witness{i}.example/w", log_vkey))
        yield started
    finally:
        for w in started:
            stop_witness(w)
