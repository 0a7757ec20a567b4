"""Run as a program (a process with one thread, as the verifier requires before it forks):
verify exports, genuine and edited, with one worker and with several, and print both
verdicts per case as JSON, with how many worker processes and thread passes were started.

``python -m tests.unit.audit.parallel_verdicts SEED [native|python]``: "python" hides the
native hasher, so the workers are forked processes running the pure-Python pass.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Any

from sandboxsec.audit import verify
from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.verify import verify_export
from tests.unit.audit.synth import SynthLog

if len(sys.argv) > 2 and sys.argv[2] == "python":
    verify._native = None  # type: ignore[assignment]
N, EVERY = 60, 7
BASE = SynthLog(N, every=EVERY)
PUB = BASE.key.public_key()
forks = threaded = 0
_real_fork = os.fork
_real_threaded = verify._threaded_shares


def _counting_threaded(*args: Any) -> Any:
    global threaded
    threaded += 1
    return _real_threaded(*args)


verify._threaded_shares = _counting_threaded  # type: ignore[assignment]


def _counting_fork() -> int:
    global forks
    pid = _real_fork()
    if pid:
        forks += 1
    return pid


os.fork = _counting_fork
_real_parallel = verify._parallel_entries
#: Whether each parallel pass of the current case held (None: it handed over to one process).
passes: list[bool] = []


def _recording_parallel(*args: Any) -> Any:
    result = _real_parallel(*args)
    if args[-1] > 1:
        passes.append(result is not None)
    return result


verify._parallel_entries = _recording_parallel  # type: ignore[assignment]


def _resigned(lines: list[bytes]) -> SynthLog:
    """The edited lines under checkpoints re-signed over them: only the per-entry checks
    can refuse them (the case of a past rewritten before the service signed it)."""
    log = SynthLog(0, every=EVERY, key=BASE.key)
    log.n, log.lines = len(lines), lines
    tree = MerkleTree(log.leaves)
    sizes = sorted({*range(EVERY, len(lines) + 1, EVERY), len(lines)} - {0})
    log.notes = {s: log.sign(s, tree.root(s)) for s in sizes}
    return log


def _edited(edit: str, k: int, rng: random.Random) -> list[bytes]:
    lines = list(BASE.lines)
    line = lines[k]
    if edit == "byte":
        p = rng.randrange(len(line))
        lines[k] = line[:p] + bytes([rng.choice(b"0123456789abcdefxyz{},:\"")]) + line[p + 1:]
    elif edit == "prev":
        old = line.split(b'"prev":"', 1)[1][:64]
        lines[k] = line.replace(old, b"%064x" % rng.getrandbits(256), 1)
    elif edit == "seq":
        lines[k] = line.replace(b'"seq":%d,' % k, b'"seq":%d,' % (k + rng.randint(1, 3)), 1)
    elif edit == "swap":
        j = rng.randrange(N)
        lines[k], lines[j] = lines[j], lines[k]
    elif edit == "drop":
        del lines[k]
    elif edit == "dup":
        lines.insert(k, line)
    elif edit == "blank":
        lines.insert(k, b"")
    return lines


def _verdict(data: bytes, workers: int) -> dict[str, Any]:
    try:
        r = verify_export(data, PUB, workers=workers)
    except AuditVerificationError as exc:
        return {"error": type(exc).__name__, "reason": exc.reason, "seq": exc.seq,
                "message": str(exc)}
    return {"entries": r.entries, "tree_size": r.tree_size, "root": r.root_hash.hex(),
            "checkpoints": r.checkpoints}


def _many(data: bytes, workers: int) -> dict[str, Any]:
    passes.clear()
    verdict = _verdict(data, workers)
    return {"verdict": verdict, "parallel_held": list(passes)}


def main() -> None:
    rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    cases: list[tuple[str, bytes]] = [("genuine", BASE.export()),
                                      ("range", BASE.export(start=14, end=49)),
                                      ("trailing newline", BASE.export() + b"\n"),
                                      ("no final newline", BASE.export().rstrip(b"\n"))]
    for edit in ("byte", "prev", "seq", "swap", "drop", "dup", "blank"):
        for k in (0, 1, N // 3, N // 2 - 1, N // 2, N // 2 + 1, N - 2, N - 1):
            lines = _edited(edit, k, rng)
            cases.append((f"{edit}@{k} re-signed", _resigned(lines).export()))
            original = SynthLog(0, every=EVERY, key=BASE.key)
            original.n, original.lines, original.notes = len(lines), lines, dict(BASE.notes)
            cases.append((f"{edit}@{k}", original.export()))
    # A log long enough for workers to reduce whole blocks of 256 leaves, with shares that
    # cut through blocks.
    big = SynthLog(1300, every=600, key=BASE.key)
    cases += [("big genuine", big.export()), ("big range", big.export(start=300, end=1200))]
    for k in (0, 255, 256, 650, 1023, 1299):
        lines = list(big.lines)
        lines[k] = lines[k].replace(b'"outcome":"', b'"outcome":"x', 1)
        edited = SynthLog(0, every=600, key=BASE.key)
        edited.n, edited.lines, edited.notes = len(lines), lines, dict(big.notes)
        cases.append((f"big byte@{k}", edited.export()))
    out = []
    for name, data in cases:
        one = _verdict(data, 1)
        out.append({"case": name, "one": one,
                    "many": {w: _many(data, w) for w in (2, 3, 5)}})
    print(json.dumps({"forks": forks, "threaded": threaded,
                      "implementation": verify.implementation(), "cases": out}))


if __name__ == "__main__":
    main()
