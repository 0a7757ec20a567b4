"""One submission reads each consistency proof once, whatever the number of witnesses."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from sandboxsec.audit.witness_client import _ProofMemo


def test_witnesses_at_the_same_size_share_one_proof() -> None:
    calls: list[int] = []
    gate = threading.Event()

    def make(old: int) -> list[bytes]:
        gate.wait(5)
        calls.append(old)
        return [bytes([old]) * 32]

    memo = _ProofMemo(make)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(memo.get, 7) for _ in range(4)] + [pool.submit(memo.get, 9)]
        gate.set()
        got = [f.result() for f in futures]
    assert sorted(calls) == [7, 9]
    assert got[:4] == [[b"\x07" * 32]] * 4 and got[4] == [b"\x09" * 32]


def test_a_failed_proof_is_not_remembered() -> None:
    attempts = []

    def make(old: int) -> list[bytes]:
        attempts.append(old)
        if len(attempts) == 1:
            raise RuntimeError("store unavailable")
        return []

    memo = _ProofMemo(make)
    with pytest.raises(RuntimeError):
        memo.get(3)
    assert memo.get(3) == []
    assert attempts == [3, 3]
