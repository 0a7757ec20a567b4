"""Offline verification of exports: every kind of tampering fails and names the entry."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.audit.errors import (
    AuditChainBrokenError,
    AuditCheckpointInvalidError,
    AuditCheckpointSignatureError,
    AuditConsistencyError,
    AuditEntryMalformedError,
    AuditEntryOrderError,
    AuditExportMalformedError,
    AuditForkError,
    AuditInclusionError,
    AuditRootMismatchError,
    AuditUncoveredEntriesError,
    AuditVerificationError,
)
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.verify import verify_entry_proof, verify_export
from tests.unit.audit.synth import KEY_NAME, LOG, SynthLog

#: Every test here runs with the native hasher and with the pure-Python pass.
pytestmark = pytest.mark.usefixtures("each_verifier")

LOG50 = SynthLog(50, every=10)
PUB = LOG50.key.public_key()


def _edit(line: bytes) -> bytes:
    return line.replace(b'"action":"payment"', b'"action":"refund"')


def test_an_untouched_export_verifies() -> None:
    report = verify_export(LOG50.export(), PUB, key_name=KEY_NAME, expected_log=LOG)
    assert (report.entries, report.tree_size, report.checkpoints) == (50, 50, 5)
    assert report.consistency_proofs == 4
    assert report.root_hash == MerkleTree(LOG50.leaves).root()


def test_a_partial_range_verifies_from_the_frontier() -> None:
    report = verify_export(LOG50.export(17, 30), PUB)
    assert (report.first_seq, report.end_seq, report.entries) == (17, 30, 13)


@pytest.mark.parametrize("k", [0, 7, 9, 23, 48])
def test_an_edited_entry_is_named(k: int) -> None:
    lines = list(LOG50.lines)
    lines[k] = _edit(lines[k])
    with pytest.raises(AuditChainBrokenError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == k


def test_editing_the_last_entry_is_caught_by_the_signed_root() -> None:
    lines = list(LOG50.lines)
    lines[49] = _edit(lines[49])
    with pytest.raises(AuditRootMismatchError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == 49
    assert exc.value.code == "audit_root_mismatch"


@pytest.mark.parametrize("k", [0, 12, 49])
def test_a_deleted_entry_is_named(k: int) -> None:
    lines = list(LOG50.lines)
    del lines[k]
    with pytest.raises(AuditEntryOrderError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == k


def test_reordered_entries_are_named() -> None:
    lines = list(LOG50.lines)
    lines[20], lines[21] = lines[21], lines[20]
    with pytest.raises(AuditEntryOrderError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == 20


def test_an_inserted_entry_is_named() -> None:
    # A forged copy of entry 30 (same seq and prev, other content) inserted before it.
    lines = list(LOG50.lines)
    lines.insert(30, _edit(lines[30]))
    with pytest.raises(AuditVerificationError) as exc:
        verify_export(LOG50.export(lines=lines[:50]), PUB)
    assert exc.value.seq == 30


def test_a_rewritten_chain_is_still_caught_by_the_checkpoint() -> None:
    # Re-hashing every later entry keeps the chain intact; the signed root still differs.
    from sandboxsec.audit.entry import encode_entry
    from sandboxsec.audit.record import AuditRecord
    from tests.unit.audit.synth import NOW, record

    lines = list(LOG50.lines[:25])
    prev = LOG50.leaves[24]
    for i in range(25, 50):
        r = record(i)
        if i == 25:
            r = AuditRecord(**{**{f: getattr(r, f) for f in r.__slots__}, "outcome": "forged"})
        e = encode_entry(r, log_id=LOG, seq=i, prev=prev, now=NOW, hmac_key=b"k" * 32)
        lines.append(e.line)
        prev = e.leaf_hash
    with pytest.raises(AuditRootMismatchError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == 29


def test_a_checkpoint_signed_by_another_key_fails() -> None:
    other = Ed25519PrivateKey.generate()
    notes = [LOG50.notes[s] for s in sorted(LOG50.notes)]
    notes[2] = LOG50.sign(30, MerkleTree(LOG50.leaves).root(30), key=other)
    with pytest.raises(AuditCheckpointSignatureError) as exc:
        verify_export(LOG50.export(notes=notes), PUB)
    assert exc.value.code == "audit_checkpoint_signature_invalid"
    # And the genuine export does not verify under the other key either.
    with pytest.raises(AuditCheckpointSignatureError):
        verify_export(LOG50.export(), other.public_key())


def test_a_checkpoint_of_another_log_is_refused() -> None:
    from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint

    notes = [LOG50.notes[s] for s in sorted(LOG50.notes)]
    cp = Checkpoint(f"{KEY_NAME}/tn_other", 50, MerkleTree(LOG50.leaves).root())
    notes[-1] = sign_checkpoint(cp, name=KEY_NAME, private_key=LOG50.key).note
    with pytest.raises(AuditCheckpointInvalidError):
        verify_export(LOG50.export(notes=notes), PUB)


def test_a_fork_is_detected() -> None:
    # Two checkpoints of size 30 signed by the real key, with different roots.
    forged_root = MerkleTree([*LOG50.leaves[:29], b"\x00" * 32]).root()
    notes = [LOG50.notes[s] for s in sorted(LOG50.notes)]
    notes.append(LOG50.sign(30, forged_root))
    with pytest.raises(AuditForkError) as exc:
        verify_export(LOG50.export(notes=notes), PUB)
    assert exc.value.code == "audit_fork_detected"


def test_a_kept_checkpoint_from_an_earlier_audit_detects_a_rewrite() -> None:
    # The auditor kept checkpoint 20 of the genuine log; the operator now shows another history.
    kept = LOG50.notes[20]
    other = SynthLog(50, every=10, key=LOG50.key)  # same key, entries differ (new secrets)
    other.lines[5] = _edit(other.lines[5])
    other_log = SynthLog.__new__(SynthLog)
    other_log.__dict__.update(other.__dict__)
    rebuilt = SynthLog(0, every=10, key=LOG50.key)
    rebuilt.n = 50
    rebuilt.lines = other.lines
    rebuilt.notes = {}
    tree = MerkleTree(rebuilt.leaves)
    for s in (10, 20, 30, 40, 50):
        rebuilt.notes[s] = rebuilt.sign(s, tree.root(s))
    data = rebuilt.export()
    # Re-signed roots over a chain whose links were not recomputed: the links are checked
    # always, so the edited entry is named even though every root matches.
    with pytest.raises(AuditChainBrokenError) as err:
        verify_export(data, PUB)
    assert err.value.seq == 5
    with pytest.raises(AuditForkError):  # ... and not with what the auditor saw before
        verify_export(data, PUB, previous_checkpoints=[kept])


def test_a_kept_checkpoint_before_the_range_needs_a_consistency_proof() -> None:
    kept = LOG50.notes[10]
    with pytest.raises(AuditConsistencyError):
        verify_export(LOG50.export(25, 50), PUB, previous_checkpoints=[kept])
    report = verify_export(
        LOG50.export(25, 50, extra_proofs=[(10, 20)]), PUB, previous_checkpoints=[kept]
    )
    assert report.consistency_proofs == 4


def test_a_bad_consistency_proof_fails() -> None:
    data = LOG50.export()
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b'{"type":"consistency"'):
            rec = json.loads(line)
            rec["proof"] = rec["proof"][:-1]
            lines[i] = json.dumps(rec).encode()
            break
    with pytest.raises(AuditConsistencyError):
        verify_export(b"\n".join(lines), PUB)


def test_entries_past_the_last_checkpoint_are_unsigned() -> None:
    log = SynthLog(25, every=10)
    notes = [log.notes[10], log.notes[20]]
    with pytest.raises(AuditUncoveredEntriesError) as exc:
        verify_export(log.export(notes=notes), log.key.public_key())
    assert exc.value.seq == 20


def test_an_entry_of_another_log_is_refused() -> None:
    lines = list(LOG50.lines)
    lines[3] = lines[3].replace(f'"log":"{LOG}"'.encode(), b'"log":"tn_other"')
    with pytest.raises(AuditEntryMalformedError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    assert exc.value.seq == 3


@pytest.mark.parametrize(
    "data",
    [b"", b"not json\n", b'{"type":"header","format":"other"}\n', b"[1]\n"],
)
def test_malformed_exports_are_refused(data: bytes) -> None:
    with pytest.raises(AuditExportMalformedError):
        verify_export(data, PUB)


def test_the_header_must_name_the_expected_log() -> None:
    with pytest.raises(AuditExportMalformedError):
        verify_export(LOG50.export(), PUB, expected_log="tn_someone_else")


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_any_changed_byte_in_any_entry_fails(data: st.DataObject) -> None:
    lines = list(LOG50.lines)
    k = data.draw(st.integers(min_value=0, max_value=49))
    pos = data.draw(st.integers(min_value=0, max_value=len(lines[k]) - 1))
    delta = data.draw(st.integers(min_value=1, max_value=255))
    b = bytearray(lines[k])
    b[pos] = (b[pos] + delta) % 256
    if b"\n" in b:
        return  # a newline splits the line: covered by the malformed and order tests
    lines[k] = bytes(b)
    with pytest.raises(AuditVerificationError) as exc:
        verify_export(LOG50.export(lines=lines), PUB)
    if exc.value.seq is not None:
        # Either the altered entry (or its predecessor, whose hash it no longer chains to) is
        # named, or, when the edit turned its sequence number into an earlier one, the repeated
        # entry is named together with the position it was found at.
        assert exc.value.seq in (k - 1, k) or f"where entry {k} belongs" in str(exc.value)


def test_single_entry_inclusion_proofs() -> None:
    tree = MerkleTree(LOG50.leaves)
    bundle = {
        "log_id": LOG,
        "seq": 17,
        "entry": LOG50.lines[17].decode(),
        "tree_size": 50,
        "checkpoint": LOG50.notes[50],
        "proof": [__import__("base64").b64encode(h).decode() for h in tree.inclusion_proof(17)],
    }
    assert verify_entry_proof(bundle, PUB).seq == 17
    with pytest.raises(AuditInclusionError):
        verify_entry_proof({**bundle, "entry": _edit(LOG50.lines[17]).decode()}, PUB)
    with pytest.raises(AuditEntryMalformedError):
        verify_entry_proof({**bundle, "seq": 18}, PUB)
    with pytest.raises(AuditCheckpointSignatureError):
        verify_entry_proof(bundle, Ed25519PrivateKey.generate().public_key())


def test_crlf_line_endings_are_reported_as_such() -> None:
    with pytest.raises(AuditExportMalformedError, match="carriage returns"):
        verify_export(LOG50.export().replace(b"\n", b"\r\n"), PUB)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_arbitrary_input_only_ever_fails_verification(data: bytes) -> None:
    with pytest.raises(AuditVerificationError):
        verify_export(data, PUB)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_truncated_or_spliced_export_fails(data: st.DataObject) -> None:
    good = LOG50.export()
    cut = data.draw(st.integers(min_value=0, max_value=len(good) - 2))
    with pytest.raises(AuditVerificationError):
        verify_export(good[:cut], PUB)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=70),
    st.integers(min_value=1, max_value=20),
    st.data(),
)
def test_any_genuine_range_of_any_log_verifies(n: int, every: int, data: st.DataObject) -> None:
    log = SynthLog(n, every=every, key=LOG50.key)
    start = data.draw(st.integers(min_value=0, max_value=n))
    # The service extends the end to the next checkpoint size, so do the same.
    end_wish = data.draw(st.integers(min_value=start, max_value=n))
    end = min(s for s in log.notes if s >= end_wish) if end_wish else 0
    if end < start:
        end = min(s for s in log.notes if s >= start)
    report = verify_export(log.export(start, end), PUB)
    assert (report.first_seq, report.end_seq, report.entries) == (start, end, end - start)


@pytest.mark.parametrize("seq", [1, 9, 10, 11, 37])
def test_a_broken_prev_link_is_named_even_when_every_root_matches(seq: int) -> None:
    """A service that signed over a broken chain (its past was altered before it signed):
    every root matches the entries, but the link is still checked and the entry named."""
    log = SynthLog(50, every=10, key=LOG50.key)
    line = log.lines[seq]
    old_prev = line.split(b'"prev":"', 1)[1][:64]
    log.lines[seq] = line.replace(old_prev, b"f" * 64, 1)
    tree = MerkleTree(log.leaves)
    log.notes = {s: log.sign(s, tree.root(s)) for s in (10, 20, 30, 40, 50)}
    with pytest.raises(AuditChainBrokenError) as err:
        verify_export(log.export(), PUB)
    assert err.value.seq == seq
    # The same in a range export starting after 0, and with the break just past the start.
    if seq >= 10:
        with pytest.raises(AuditChainBrokenError) as err2:
            verify_export(log.export(10, 50), PUB)
        assert err2.value.seq == seq


def test_a_sequence_number_out_of_place_is_named_even_when_every_root_matches() -> None:
    log = SynthLog(30, every=10, key=LOG50.key)
    log.lines[12] = log.lines[12].replace(b'"seq":12,', b'"seq":13,', 1)
    tree = MerkleTree(log.leaves)
    log.notes = {s: log.sign(s, tree.root(s)) for s in (10, 20, 30)}
    with pytest.raises(AuditEntryOrderError) as err:
        verify_export(log.export(), PUB)
    assert err.value.seq == 12
