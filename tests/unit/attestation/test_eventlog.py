"""TCG crypto-agile event logs: parsing, replay, comparison, and hostile bytes."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation import eventlog
from sandboxsec.attestation.errors import (
    EventLogDigestNotAllowedError,
    EventLogMalformedError,
    EventLogReplayMismatchError,
    EventLogTooLargeError,
)
from tests.support.softtpm import boot_log


def _extend(value: bytes, digest: bytes, alg: str = "sha256") -> bytes:
    return hashlib.new(alg, value + digest).digest()


def test_replay_matches_measured_boot() -> None:
    log, pcrs, digests = boot_log(60)
    parsed = eventlog.parse_event_log(log)
    assert len(parsed.events) == 60 and parsed.algorithms == {"sha256": 32}
    result = eventlog.replay(parsed)
    assert result.pcrs["sha256"] == pcrs
    assert result.unknown_event_types == ()
    eventlog.check_replay(result, {"sha256": pcrs})
    eventlog.check_reference_digests(result, {4: tuple(digests[4])})


def test_two_banks_and_no_action_events() -> None:
    b = eventlog.EventLogBuilder(("sha1", "sha256"))
    d = b.add(0, 0x8, b"crtm version")
    b.add(0, eventlog.EV_NO_ACTION, b"informational")
    result = eventlog.replay(eventlog.parse_event_log(b.to_bytes()))
    assert result.pcrs["sha1"][0] == _extend(bytes(20), d["sha1"], "sha1")
    assert result.pcrs["sha256"][0] == _extend(bytes(32), d["sha256"])


def test_startup_locality_sets_pcr0_initial_value() -> None:
    b = eventlog.EventLogBuilder(("sha256",), locality=3)
    d = b.add(0, 0x8, b"crtm")["sha256"]
    result = eventlog.replay(eventlog.parse_event_log(b.to_bytes()))
    assert result.pcrs["sha256"][0] == _extend(bytes(31) + b"\x03", d)


def test_unknown_event_types_replay_by_digest_and_are_named() -> None:
    b = eventlog.EventLogBuilder()
    d = b.add(5, 0x7777, b"vendor thing")["sha256"]
    result = eventlog.replay(eventlog.parse_event_log(b.to_bytes()))
    assert result.pcrs["sha256"][5] == _extend(bytes(32), d)
    assert result.unknown_event_types == ("UNKNOWN_0x00007777",)


def test_replay_mismatch_and_unexplained_pcr() -> None:
    log, pcrs, _ = boot_log(16)
    result = eventlog.replay_bytes(log)
    tampered = {**pcrs, 2: bytes(32)}
    with pytest.raises(EventLogReplayMismatchError, match="sha256:2"):
        eventlog.check_replay(result, {"sha256": tampered})
    with pytest.raises(EventLogReplayMismatchError, match="sha256:9"):
        eventlog.check_replay(result, {"sha256": {**pcrs, 9: b"\x01" * 32}})
    eventlog.check_replay(result, {"sha256": {**pcrs, 9: bytes(32)}})
    with pytest.raises(EventLogReplayMismatchError):
        eventlog.check_replay(result, {"sha384": {0: bytes(48)}})


def test_reference_digests_are_an_allow_list() -> None:
    log, _, digests = boot_log(16)
    result = eventlog.replay_bytes(log)
    with pytest.raises(EventLogDigestNotAllowedError):  # one of PCR 4's events is not listed
        eventlog.check_reference_digests(result, {4: tuple(digests[4][1:])})
    with pytest.raises(EventLogDigestNotAllowedError):  # right digests, wrong PCR
        eventlog.check_reference_digests(result, {5: tuple(digests[4])})
    eventlog.check_reference_digests(result, {4: (*digests[4], hashlib.sha256(b"x").digest())})


def test_limits() -> None:
    log, _, _ = boot_log(30)
    with pytest.raises(EventLogTooLargeError):
        eventlog.parse_event_log(log, max_bytes=100)
    with pytest.raises(EventLogTooLargeError):
        eventlog.parse_event_log(log, max_events=10)


def test_structural_refusals() -> None:
    log, _, _ = boot_log(8)
    with pytest.raises(EventLogMalformedError, match="Spec ID"):
        eventlog.parse_event_log(log[:32] + b"X" + log[33:])
    with pytest.raises(EventLogMalformedError):
        eventlog.parse_event_log(log[:-3])
    bad_pcr = bytearray(log)
    first = 32 + struct.unpack_from("<I", log, 28)[0]
    bad_pcr[first : first + 4] = struct.pack("<I", 40)
    with pytest.raises(EventLogMalformedError, match="PCR 40"):
        eventlog.parse_event_log(bytes(bad_pcr))
    with pytest.raises(EventLogMalformedError):
        eventlog.parse_event_log(b"")


@st.composite
def mutated_log(draw: st.DrawFn) -> bytes:
    log = bytearray(boot_log(draw(st.integers(1, 12)))[0])
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(log) - 1))
        if draw(st.booleans()):
            log[i] = draw(st.integers(0, 255))
        else:
            del log[i : i + draw(st.integers(1, 16))]
    return bytes(log)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=400), mutated_log()))
def test_hostile_bytes_get_a_reason_code(data: bytes) -> None:
    try:
        result = eventlog.replay(eventlog.parse_event_log(data, max_events=64))
    except (EventLogMalformedError, EventLogTooLargeError):
        return
    for values in result.pcrs.values():
        assert all(len(v) in (20, 32, 48, 64) for v in values.values())


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=400), mutated_log()))
def test_one_pass_replay_agrees_with_parse_then_replay(data: bytes) -> None:
    """The verifier's one-pass replay gives the same answer, or the same error code."""
    try:
        expected: object = eventlog.replay(eventlog.parse_event_log(data, max_events=64))
    except (EventLogMalformedError, EventLogTooLargeError) as exc:
        expected = exc.reason
    try:
        got: object = eventlog._replay_direct(data, eventlog.DEFAULT_MAX_BYTES, 64)
    except (EventLogMalformedError, EventLogTooLargeError) as exc:
        got = exc.reason
    assert got == expected


def test_one_pass_replay_with_locality_and_two_banks() -> None:
    b = eventlog.EventLogBuilder(("sha1", "sha256"), locality=4)
    b.add(0, 0x8, b"crtm")
    b.add(3, 0x7777, b"vendor")
    data = b.to_bytes()
    assert eventlog._replay_direct(data, 1 << 20, 100) == eventlog.replay(
        eventlog.parse_event_log(data)
    )
