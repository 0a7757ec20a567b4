"""The fast verifier against a straightforward one: same verdict on every export.

The fast path checks sequence numbers and prev links of all entries in one prefix pass and
hashes leaves in bulk.  The reference below does the obvious thing entry by entry.  The
checkpoints are re-signed over whatever the entries hash to, so the roots always match and the
verdict turns on the per-entry checks alone (the case an altered past signed by the service
produces).
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.verify import verify_export
from tests.unit.audit.synth import LOG, SynthLog

#: Every test here runs with the native hasher and with the pure-Python pass.
pytestmark = pytest.mark.usefixtures("each_verifier")

BASE = SynthLog(40, every=7)
PUB = BASE.key.public_key()


def _reference_ok(lines: list[bytes]) -> bool:
    """Entry by entry: the literal head with the right seq and the previous leaf's hex."""
    prev = "0" * 64
    for i, line in enumerate(lines):
        head = f'{{"v":1,"log":"{LOG}","seq":{i},"prev":"{prev}"'.encode()
        if not line.startswith(head):
            return False
        prev = hashlib.sha256(b"\x00" + line).hexdigest()
    return True


def _fast_ok(log: SynthLog) -> bool:
    try:
        verify_export(log.export(), PUB)
    except AuditVerificationError:
        return False
    return True


def _resigned(lines: list[bytes]) -> SynthLog:
    log = SynthLog(0, every=7, key=BASE.key)
    log.n, log.lines = len(lines), lines
    tree = MerkleTree(log.leaves)
    sizes = sorted({*range(7, len(lines) + 1, 7), len(lines)} - {0})
    log.notes = {s: log.sign(s, tree.root(s)) for s in sizes}
    return log


_EDITS = st.sampled_from(["byte", "prev", "seq", "swap", "drop", "dup", "none"])


@settings(max_examples=150, deadline=None)
@given(_EDITS, st.integers(min_value=0, max_value=39), st.integers(min_value=0, max_value=400),
       st.integers(min_value=0, max_value=255))
def test_fast_and_straightforward_verifiers_agree(edit: str, k: int, pos: int, byte: int) -> None:
    lines = list(BASE.lines)
    line = lines[k]
    if edit == "byte":
        p = pos % len(line)
        lines[k] = line[:p] + bytes([byte if byte != 10 else 11]) + line[p + 1:]
    elif edit == "prev":
        old = line.split(b'"prev":"', 1)[1][:64]
        lines[k] = line.replace(old, b"%064x" % (byte * 7919 + pos), 1)
    elif edit == "seq":
        lines[k] = line.replace(b'"seq":%d,' % k, b'"seq":%d,' % (k + 1 + pos % 3), 1)
    elif edit == "swap":
        j = (k + 1 + pos) % len(lines)
        lines[k], lines[j] = lines[j], lines[k]
    elif edit == "drop":
        del lines[k]
    elif edit == "dup":
        lines.insert(k, line)
    log = _resigned(lines)
    assert _fast_ok(log) == _reference_ok(lines)
    # And, unsigned again, with the original checkpoints: any real change is refused.
    if lines != BASE.lines:
        original = SynthLog(0, every=7, key=BASE.key)
        original.n, original.lines, original.notes = len(lines), lines, dict(BASE.notes)
        assert not _fast_ok(original)
