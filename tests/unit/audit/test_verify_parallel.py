"""Verification split over workers gives the one-worker verdict, word for word.

The workers (threads running the native hasher, or forked processes running the Python pass
when it is not built) only hash and check heads and links of their share; anything that fails
there (or a root that does not match) is named by the one-pass checks, so the error, its
reason code and the entry it names must be the same whatever the number of workers.
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


@pytest.mark.parametrize(("seed", "impl"), [(1, "python"), (2, "python"), (1, "native"),
                                            (2, "native")])
def test_several_workers_reach_the_one_worker_verdict(seed: int, impl: str) -> None:
    if impl == "native" and verify.implementation() != "native":
        pytest.skip("the native hasher is not built (test_native_build says whether it must be)")
    # A fresh interpreter: the verifier forks only in a process that runs no other thread.
    out = subprocess.run(
        [sys.executable, "-m", "tests.unit.audit.parallel_verdicts", str(seed), impl],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    cases = result["cases"]
    assert result["implementation"] == impl
    if impl == "python":
        assert result["forks"] > 0, "no worker process was started"
    else:
        assert result["forks"] == 0 and result["threaded"] > 0, "no worker thread ran"
    assert any("entries" in c["one"] for c in cases)
    assert sum("error" in c["one"] for c in cases) > 50
    for c in cases:
        for workers, many in c["many"].items():
            assert many["verdict"] == c["one"], (c["case"], workers)
            if "entries" in c["one"]:
                # An export that verifies was hashed by the workers, not handed back.
                assert many["parallel_held"] == [True], (c["case"], workers)


def test_a_process_running_threads_is_not_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "_native", None)  # the Python pass forks processes
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert verify.worker_count(4, 1 << 30) == 1
        assert verify.worker_count(None, 1 << 30) == 1
    finally:
        stop.set()
        t.join()


def test_threads_of_the_caller_do_not_stop_native_workers() -> None:
    if verify.implementation() != "native":
        pytest.skip("the native hasher is not built")
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        # Worker threads share no lock with the caller's threads: nothing to inherit.
        assert verify.worker_count(4, 1 << 30) == 4
    finally:
        stop.set()
        t.join()


def test_small_exports_are_verified_in_one_process() -> None:
    assert verify.worker_count(None, 1 << 10) == 1
    assert verify.worker_count(1, 1 << 30) == 1
