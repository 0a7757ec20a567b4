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
    return _started(_launch(home, name, log_vkey, port), home, name)


def _launch(home: Path, name: str, log_vkey: str, port: int = 0) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "sandboxsec.cli", "witness", "serve", "--home", str(home),
         "--name", name, "--log-key", log_vkey, "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _started(proc: subprocess.Popen[str], home: Path, name: str) -> WitnessProcess:
    """The witness ``proc`` once it printed where it listens (killed if it printed else)."""
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
    _reap(w)


def _reap(w: WitnessProcess) -> None:
    if w.proc.poll() is None:
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
    # All launched before any is waited for: each spends its first second or two importing,
    # and they need not take turns at that.
    homes = [(tmp / f"witness{i}", f"witness{i}.example/w") for i in range(n)]
    launched = [_launch(home, name, log_vkey) for home, name in homes]
    try:
        for proc, (home, name) in zip(launched, homes, strict=True):
            started.append(_started(proc, home, name))
        yield started
    finally:
        # Told to stop together, then waited for: each takes a moment to shut down.
        for w in started:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in started:
            _reap(w)
        for proc in launched[len(started):]:  # launched, never seen up: leave none running
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
