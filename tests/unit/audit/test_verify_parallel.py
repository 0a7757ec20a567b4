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
from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.merkle import MerkleTree

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


def test_a_share_whose_first_line_claims_the_wrong_number_is_not_accepted() -> None:
    """A later share checks its heads against the number its first line claims; lines
    renumbered from the cut on, each linked to the line before, hold inside the share, so only
    the comparison with the count of the lines before can refuse them."""
    if verify.implementation() != "native":
        pytest.skip("the native hasher is not built (threads run in this process)")
    from tests.unit.audit.synth import SynthLog

    log = SynthLog(40, every=40)
    data = log.export()
    at = verify._lines_before_entries(data)[1]
    end = len(data) - 1
    cut = data.find(b"\n", at + (end - at) // 2, end) + 1
    # The middle cut of the shares two workers take.
    assert cut in {lo for lo, _ in verify._split(data, at, end, 2 * verify._SHARES_PER_THREAD)}
    k = data.count(b"\n", at, cut)  # the first line of the share after it
    lines = list(log.lines)
    prev = lines[k - 1]
    for i in range(k, len(lines)):
        rest = lines[i].split(b'"prev":"', 1)[1][64:]
        lines[i] = (b'{"v":1,"log":"tn_test","seq":%d,"prev":"%s' % (i + 3, verify.leaf_hash(
            prev).hex().encode()) + rest)
        prev = lines[i]
    forged = log.export(lines=lines)
    prefix = verify.entry_prefix("tn_test")
    genesis = verify.GENESIS_PREV.encode()
    # Same lengths, so the cut falls on the same line.
    assert len(forged) == len(data) and verify._claimed_seq(forged, cut, prefix) == k + 3
    assert verify._parallel_entries(forged, at, len(forged) - 1, prefix, 0, genesis,
                                    2).result() is None
    assert verify._parallel_entries(data, at, end, prefix, 0, genesis, 2).result() is not None
    # Under the original checkpoints, and under checkpoints signed over the renumbered lines
    # (a past rewritten before the service signed it: every root matches).
    resigned = SynthLog(0, every=40, key=log.key)
    resigned.n, resigned.lines = len(lines), lines
    resigned.notes = {40: log.sign(40, MerkleTree(resigned.leaves).root())}
    for export in (forged, resigned.export()):
        verdicts = []
        for workers in (1, 2):
            with pytest.raises(AuditVerificationError) as exc:
                verify.verify_export(export, log.key.public_key(), workers=workers)
            verdicts.append((exc.value.reason, exc.value.seq, str(exc.value)))
        assert verdicts[0] == verdicts[1] and verdicts[0][1] == k
