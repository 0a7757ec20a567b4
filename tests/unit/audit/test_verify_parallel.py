"""Verification split over worker processes gives the one-process verdict, word for word.

The workers only hash and check heads and links of their share; anything that fails there
(or a root that does not match) is named by the one-process pass, so the error, its reason
code and the entry it names must be the same whatever the number of workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sandboxsec.audit import verify

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("seed", [1, 2])
def test_several_processes_reach_the_one_process_verdict(seed: int) -> None:
    # A fresh interpreter: the verifier forks only in a process that runs no other thread.
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.audit.parallel_verdicts", str(seed)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    cases = result["cases"]
    assert result["forks"] > 0, "no worker process was started"
    assert any("entries" in c["one"] for c in cases)
    assert sum("error" in c["one"] for c in cases) > 50
    for c in cases:
        for workers, many in c["many"].items():
            assert many["verdict"] == c["one"], (c["case"], workers)
            if "entries" in c["one"]:
                # An export that verifies was hashed by the workers, not handed back.
                assert many["parallel_held"] == [True], (c["case"], workers)


def test_a_process_running_threads_is_not_forked() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert verify.worker_count(4, 1 << 30) == 1
        assert verify.worker_count(None, 1 << 30) == 1
    finally:
        stop.set()
        t.join()


def test_small_exports_are_verified_in_one_process() -> None:
    assert verify.worker_count(None, 1 << 10) == 1
    assert verify.worker_count(1, 1 << 30) == 1
