"""The service's signed state outside the database, and the check it runs before signing."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sandboxsec.audit.errors import AuditHistoryMismatchError, AuditStateInvalidError
from sandboxsec.audit.merkle import Frontier
from sandboxsec.audit.signed_state import SignedState, StateFiles, check_extends
from tests.unit.audit.synth import LOG, SynthLog

SYNTH = SynthLog(30, every=10)
LEAVES = SYNTH.leaves


def _state(size: int) -> SignedState:
    f = Frontier()
    f.extend(LEAVES[:size])
    return SignedState(LOG, size, f.root(), tuple(f.hashes or ()),
                       LEAVES[size - 1] if size else None, SYNTH.notes.get(size, "note"))


def _stored(lo: int, hi: int, lines: list[bytes] | None = None) -> list[tuple[int, bytes, bytes]]:
    lines = lines or SYNTH.lines
    import hashlib

    return [(i, lines[i], hashlib.sha256(b"\x00" + lines[i]).digest()) for i in range(lo, hi)]


def _root(size: int) -> bytes:
    f = Frontier()
    f.extend(LEAVES[:size])
    return f.root()


def test_an_honest_extension_passes() -> None:
    # Stored entries 10..19 since the signed size, and 20..29 being appended now.
    check_extends(_state(10), _stored(10, 20), LEAVES[20:30], LEAVES[19], 30, _root(30))
    check_extends(_state(10), [], [], None, 10, _root(10))
    check_extends(_state(0), _stored(0, 5), [], None, 5, _root(5))


def test_a_rewritten_past_is_refused() -> None:
    # Entry 5 rewritten and everything recomputed: the new tree does not extend the signed one.
    import hashlib

    lines = list(SYNTH.lines)
    lines[5] = lines[5].replace(b'"outcome":"', b'"outcome":"x', 1)
    leaves = [hashlib.sha256(b"\x00" + ln).digest() for ln in lines[:6]]
    for i in range(6, 20):
        old = lines[i].split(b'"prev":"', 1)[1][:64]
        lines[i] = lines[i].replace(old, leaves[i - 1].hex().encode(), 1)
        leaves.append(hashlib.sha256(b"\x00" + lines[i]).digest())
    # The stored continuation no longer links to the signed last leaf ...
    with pytest.raises(AuditHistoryMismatchError, match="does not continue"):
        check_extends(_state(10), _stored(10, 20, lines), [], None, 20,
                      Frontier.from_leaves(leaves, 20).root())
    # ... and a head whose frontier was rewritten gives another root than the signed one
    # extended by the stored leaves.
    with pytest.raises(AuditHistoryMismatchError, match="past was altered"):
        check_extends(_state(10), _stored(10, 20), [], None, 20,
                      Frontier.from_leaves(leaves, 20).root())


def test_a_shorter_log_is_refused() -> None:
    with pytest.raises(AuditHistoryMismatchError, match="fewer"):
        check_extends(_state(20), [], [], None, 15, _root(15))


def test_a_gap_an_edited_line_or_a_broken_link_in_the_continuation_is_refused() -> None:
    stored = _stored(10, 20)
    gap = stored[:3] + stored[4:]
    with pytest.raises(AuditHistoryMismatchError):
        check_extends(_state(10), gap, [], None, 20, _root(20))
    edited = list(stored)
    seq, line, leaf = edited[2]
    edited[2] = (seq, line.replace(b'"outcome":"', b'"outcome":"x'), leaf)
    with pytest.raises(AuditHistoryMismatchError):
        check_extends(_state(10), edited, [], None, 20, _root(20))
    # The entries being appended must follow the last stored one.
    with pytest.raises(AuditHistoryMismatchError, match="head"):
        check_extends(_state(10), stored, LEAVES[20:30], LEAVES[18], 30, _root(30))


def test_state_files_are_private_maced_and_only_move_forward(tmp_path: Path) -> None:
    files = StateFiles(tmp_path / "audit", lambda: b"k" * 32)
    assert files.load(LOG) is None
    assert files.advance(_state(20))
    assert not files.advance(_state(10))  # never backwards
    loaded = files.load(LOG)
    assert loaded == _state(20)
    path = tmp_path / "audit" / "state" / f"{LOG}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Any edit without the key fails the MAC.
    doc = json.loads(path.read_text())
    doc["size"] = 10
    path.write_text(json.dumps(doc))
    with pytest.raises(AuditStateInvalidError):
        files.load(LOG)
    # Another key (another service home) fails too; so does another log's file.
    path.unlink()
    files.advance(_state(20))
    with pytest.raises(AuditStateInvalidError):
        StateFiles(tmp_path / "audit", lambda: b"j" * 32).load(LOG)
    (path.parent / "tn_other.json").write_bytes(path.read_bytes())
    with pytest.raises(AuditStateInvalidError):
        files.load("tn_other")


def test_alarms_are_shared_markers(tmp_path: Path) -> None:
    a = StateFiles(tmp_path / "audit", lambda: b"k" * 32)
    b = StateFiles(tmp_path / "audit", lambda: b"k" * 32)  # another worker on the same home
    now = datetime(2026, 12, 1, tzinfo=UTC)
    a.raise_alarm(LOG, "audit_history_mismatch", "rewritten", now)
    a.raise_alarm(LOG, "audit_witness_refused", "later", now)  # the first alarm is kept
    alarm = b.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_history_mismatch"
    assert [x.log_id for x in b.alarms()] == [LOG]
    marker = tmp_path / "audit" / "alarms" / f"{LOG}.json"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600
    # An unreadable marker still counts (fail closed).
    marker.write_text("{")
    assert b.alarm(LOG) is not None
    assert b.clear_alarm(LOG) and b.alarm(LOG) is None and b.alarms() == []
    # Odd log ids get a hashed file name, never a path.
    a.raise_alarm("../../etc/passwd", "audit_state_invalid", "x", now)
    assert all(p.parent.name == "alarms" for p in (tmp_path / "audit").rglob("*.json")
               if "alarms" in str(p))
    assert a.alarm("../../etc/passwd") is not None


def test_an_alarm_raised_after_a_check_stops_the_next_one(tmp_path: Path) -> None:
    # The worker that checks keeps the marker's path, never the answer: a marker another
    # worker writes between two appends stops the second, and so does one it cannot read.
    checker = StateFiles(tmp_path / "audit", lambda: b"k" * 32)
    raiser = StateFiles(tmp_path / "audit", lambda: b"k" * 32)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert checker.alarm(LOG) is None
    raiser.raise_alarm(LOG, "audit_history_mismatch", "rewritten", now)
    found = checker.alarm(LOG)
    assert found is not None and found.code == "audit_history_mismatch"
    assert checker.clear_alarm(LOG) and checker.alarm(LOG) is None
    marker = tmp_path / "audit" / "alarms" / f"{LOG}.json"
    marker.mkdir()  # not a file: reading it fails with an OSError other than "missing"
    unreadable = checker.alarm(LOG)
    assert unreadable is not None and unreadable.code == "audit_state_invalid"
    marker.rmdir()
    marker.write_text("[1, 2]")  # JSON, but not a marker
    wrong = checker.alarm(LOG)
    assert wrong is not None and wrong.code == "audit_state_invalid"
