"""TCG PC Client crypto-agile event logs: parse, replay into PCRs, compare, build.

The log starts with one event in the SHA-1 format (``TCG_PCClientPCREvent``) whose data is the
``Spec ID Event03`` header listing the digest algorithms and their sizes; every following
event is a ``TCG_PCR_EVENT2`` carrying one digest per listed algorithm.  All integers are
little-endian.

Contract: :func:`parse_event_log` takes bytes and limits and returns a frozen
:class:`EventLog` or raises :class:`EventLogMalformedError` / :class:`EventLogTooLargeError`;
it never raises anything else, whatever the bytes.  Replay extends each event's *digest*
(the event data is never re-hashed: firmware measures things the verifier cannot see), so an
event type this module does not know replays like any other and is named in the result.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, NamedTuple

from sandboxsec.attestation.errors import (
    EventLogDigestNotAllowedError,
    EventLogMalformedError,
    EventLogReplayMismatchError,
    EventLogTooLargeError,
)

__all__ = [
    "EVENT_TYPES",
    "EV_NO_ACTION",
    "Event",
    "EventLog",
    "EventLogBuilder",
    "Replay",
    "check_reference_digests",
    "check_replay",
    "parse_event_log",
    "replay",
    "replay_bytes",
]

EV_NO_ACTION: Final = 0x00000003

#: Event types of the PC Client Platform Firmware Profile, by value.
EVENT_TYPES: Final[Mapping[int, str]] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

#: TPM_ALG_ID -> hashlib name of the banks this module can replay.
_ALGS: Final[Mapping[int, str]] = {
    0x0004: "sha1",
    0x000B: "sha256",
    0x000C: "sha384",
    0x000D: "sha512",
}
_ALG_IDS: Final = {name: alg for alg, name in _ALGS.items()}
_SIZES: Final = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

_SPEC_ID_SIGNATURE: Final = b"Spec ID Event03\x00"
_STARTUP_LOCALITY: Final = b"StartupLocality\x00"
_PCR_COUNT: Final = 24
_MAX_ALGORITHMS: Final = 8
_MAX_DIGEST_SIZE: Final = 64

DEFAULT_MAX_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_EVENTS: Final = 20_000
# Replays of logs up to this size are memoised by their bytes: a fleet booting one image
# sends the same log again and again, and the replay is a pure function of the bytes.
_CACHEABLE_BYTES: Final = 128 * 1024


class Event(NamedTuple):
    """One measured event: PCR, type, the digest per bank, and its data.

    A named tuple rather than a frozen dataclass: logs hold thousands of events and tuple
    construction is several times cheaper.
    """

    seq: int
    pcr: int
    type: int
    type_name: str  # "UNKNOWN_0x..." for types this module does not know
    digests: Mapping[str, bytes]
    data: bytes

    @property
    def known(self) -> bool:
        return self.type in EVENT_TYPES


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed event log: its header's algorithms and the events after the header."""

    spec_version: str
    algorithms: Mapping[str, int]  # bank name -> digest size (unknown algs as "alg_0x....")
    startup_locality: int
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Replay:
    """PCR values a log replays to, per bank and index, and the event types it did not know."""

    pcrs: Mapping[str, Mapping[int, bytes]]
    unknown_event_types: tuple[str, ...]
    event_count: int
    extended: Mapping[int, tuple[bytes, ...]]  # PCR -> sha256 digests extended, in order


_EVENT_HEAD: Final = struct.Struct("<III")
_HASHERS: Final = {"sha1": hashlib.sha1, "sha256": hashlib.sha256,
                   "sha384": hashlib.sha384, "sha512": hashlib.sha512}


class _Reader:
    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining:
            raise EventLogMalformedError(
                f"truncated at byte {self._pos}: needs {n}, {self.remaining} left"
            )
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack("<H", self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = struct.unpack("<I", self.take(4))[0]
        return v


def _type_name(event_type: int) -> str:
    return EVENT_TYPES.get(event_type, f"UNKNOWN_{event_type:#010x}")


def _parse_spec_id(data: bytes) -> tuple[str, dict[str, int], list[tuple[int, str, int]]]:
    r = _Reader(data)
    # 1. The signature names the crypto-agile format; anything else is a SHA-1-only log.
    if r.take(16) != _SPEC_ID_SIGNATURE:
        raise EventLogMalformedError("first event is not a 'Spec ID Event03' header")
    r.u32()  # platformClass
    minor, major, errata, uintn = r.u8(), r.u8(), r.u8(), r.u8()
    if uintn not in (1, 2):
        raise EventLogMalformedError(f"uintnSize {uintn} is neither 1 nor 2")
    # 2. The algorithm table fixes the digest size of every later event.
    count = r.u32()
    if not 1 <= count <= _MAX_ALGORITHMS:
        raise EventLogMalformedError(f"header lists {count} digest algorithms")
    algs: list[tuple[int, str, int]] = []
    sizes: dict[str, int] = {}
    for _ in range(count):
        alg_id, size = r.u16(), r.u16()
        name = _ALGS.get(alg_id, f"alg_{alg_id:#06x}")
        if name in sizes:
            raise EventLogMalformedError(f"algorithm {name} listed twice")
        if not 1 <= size <= _MAX_DIGEST_SIZE or (name in _SIZES and size != _SIZES[name]):
            raise EventLogMalformedError(f"digest size {size} is wrong for {name}")
        sizes[name] = size
        algs.append((alg_id, name, size))
    vendor = r.u8()
    r.take(vendor)
    if r.remaining:
        raise EventLogMalformedError("trailing bytes after the Spec ID header")
    return f"{major}.{minor}.{errata}", sizes, algs


def parse_event_log(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_events: int = DEFAULT_MAX_EVENTS,
) -> EventLog:
    """Parse a crypto-agile TCG event log within size and event-count limits."""
    if len(data) > max_bytes:
        raise EventLogTooLargeError(f"event log of {len(data)} bytes exceeds {max_bytes}")
    r = _Reader(data)
    # 1. The header event, in the SHA-1 layout, carrying the Spec ID structure.
    pcr, event_type = r.u32(), r.u32()
    r.take(20)
    if pcr != 0 or event_type != EV_NO_ACTION:
        raise EventLogMalformedError("first event is not an EV_NO_ACTION header in PCR 0")
    header = r.take(r.u32())
    version, sizes, algs = _parse_spec_id(header)
    by_id = {alg_id: (name, size) for alg_id, name, size in algs}
    # 2. Every TCG_PCR_EVENT2 after it, each with exactly one digest per listed algorithm.
    #    Offsets are tracked by hand with unpack_from: logs run to thousands of events.
    events: list[Event] = []
    locality = 0
    pos = r.position
    size = len(data)
    n_algs = len(algs)
    unpack_head = _EVENT_HEAD.unpack_from
    while pos < size:
        seq = len(events)
        if seq >= max_events:
            raise EventLogTooLargeError(f"event log has more than {max_events} events")
        if pos + 12 > size:
            raise EventLogMalformedError(f"event {seq} is truncated")
        pcr, event_type, count = unpack_head(data, pos)
        pos += 12
        if pcr >= _PCR_COUNT:
            raise EventLogMalformedError(f"event {seq} extends PCR {pcr}")
        if count != n_algs:
            raise EventLogMalformedError(
                f"event {seq} has {count} digests, the header lists {n_algs}"
            )
        digests: dict[str, bytes] = {}
        for _ in range(count):
            if pos + 2 > size:
                raise EventLogMalformedError(f"event {seq} is truncated")
            alg_id = data[pos] | (data[pos + 1] << 8)
            entry = by_id.get(alg_id)
            if entry is None:
                raise EventLogMalformedError(f"event {seq} uses unlisted alg {alg_id:#x}")
            name, digest_size = entry
            if name in digests:
                raise EventLogMalformedError(f"event {seq} repeats the {name} digest")
            end = pos + 2 + digest_size
            if end > size:
                raise EventLogMalformedError(f"event {seq} is truncated")
            digests[name] = data[pos + 2 : end]
            pos = end
        if pos + 4 > size:
            raise EventLogMalformedError(f"event {seq} is truncated")
        body_size = int.from_bytes(data[pos : pos + 4], "little")
        end = pos + 4 + body_size
        if end > size:
            raise EventLogMalformedError(
                f"event {seq} claims {body_size} bytes of data, {size - pos - 4} left"
            )
        body = data[pos + 4 : end]
        pos = end
        if event_type == EV_NO_ACTION and pcr == 0 and body[:16] == _STARTUP_LOCALITY:
            if len(body) != 17:
                raise EventLogMalformedError("StartupLocality event has the wrong size")
            locality = body[16]
        name = EVENT_TYPES.get(event_type) or _type_name(event_type)
        events.append(Event(seq, pcr, event_type, name, digests, body))
    return EventLog(
        spec_version=version, algorithms=sizes, startup_locality=locality, events=tuple(events)
    )


def _initial(pcr: int, size: int, locality: int) -> bytes:
    # PCR 0 starts at the startup locality (H-CRTM sets 4); every other PCR at zero.
    if pcr == 0 and locality:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


def replay(log: EventLog) -> Replay:
    """Extend every measured event's digest into its PCR, per bank this module can hash.

    EV_NO_ACTION events are informational and never extended.  Only PCRs at least one event
    touches appear in the result, except PCR 0 which is present when a locality is set.
    """
    banks = [name for name in log.algorithms if name in _SIZES]
    pcrs: dict[str, dict[int, bytes]] = {bank: {} for bank in banks}
    extended: dict[int, list[bytes]] = {}
    unknown: dict[str, None] = {}
    hashers = [(bank, _HASHERS[bank], pcrs[bank]) for bank in banks]
    for event in log.events:
        if event.type not in EVENT_TYPES:
            unknown[event.type_name] = None
        if event.type == EV_NO_ACTION:
            continue
        for bank, hasher, values in hashers:
            current = values.get(event.pcr)
            if current is None:
                current = _initial(event.pcr, _SIZES[bank], log.startup_locality)
            values[event.pcr] = hasher(current + event.digests[bank]).digest()
        if "sha256" in event.digests:
            extended.setdefault(event.pcr, []).append(event.digests["sha256"])
    return Replay(
        pcrs={bank: dict(values) for bank, values in pcrs.items()},
        unknown_event_types=tuple(unknown),
        event_count=len(log.events),
        extended={pcr: tuple(digests) for pcr, digests in extended.items()},
    )


def _replay_direct(data: bytes, max_bytes: int, max_events: int) -> Replay:
    """``replay(parse_event_log(data))`` in one pass, without building :class:`Event` values.

    The same validation in the same order (a differential test holds the two to the same
    answers); this is the verifier's path, where every microsecond per event counts.
    """
    if len(data) > max_bytes:
        raise EventLogTooLargeError(f"event log of {len(data)} bytes exceeds {max_bytes}")
    r = _Reader(data)
    pcr, event_type = r.u32(), r.u32()
    r.take(20)
    if pcr != 0 or event_type != EV_NO_ACTION:
        raise EventLogMalformedError("first event is not an EV_NO_ACTION header in PCR 0")
    _, _, algs = _parse_spec_id(r.take(r.u32()))
    by_id = {alg_id: (name, size) for alg_id, name, size in algs}
    replayable = [name for _, name, _ in algs if name in _SIZES]
    n_algs = len(algs)
    pos = r.position
    size = len(data)
    unpack_head = _EVENT_HEAD.unpack_from
    # 1. Walk the events, keeping only what replay needs: PCR, type, per-bank digests.
    measured: list[tuple[int, dict[str, bytes]]] = []
    unknown: dict[str, None] = {}
    locality = 0
    seq = 0
    while pos < size:
        if seq >= max_events:
            raise EventLogTooLargeError(f"event log has more than {max_events} events")
        if pos + 12 > size:
            raise EventLogMalformedError(f"event {seq} is truncated")
        pcr, event_type, count = unpack_head(data, pos)
        pos += 12
        if pcr >= _PCR_COUNT:
            raise EventLogMalformedError(f"event {seq} extends PCR {pcr}")
        if count != n_algs:
            raise EventLogMalformedError(
                f"event {seq} has {count} digests, the header lists {n_algs}"
            )
        digests: dict[str, bytes] = {}
        for _ in range(count):
            if pos + 2 > size:
                raise EventLogMalformedError(f"event {seq} is truncated")
            alg_id = data[pos] | (data[pos + 1] << 8)
            entry = by_id.get(alg_id)
            if entry is None:
                raise EventLogMalformedError(f"event {seq} uses unlisted alg {alg_id:#x}")
            name, digest_size = entry
            if name in digests:
                raise EventLogMalformedError(f"event {seq} repeats the {name} digest")
            end = pos + 2 + digest_size
            if end > size:
                raise EventLogMalformedError(f"event {seq} is truncated")
            digests[name] = data[pos + 2 : end]
            pos = end
        if pos + 4 > size:
            raise EventLogMalformedError(f"event {seq} is truncated")
        body_size = int.from_bytes(data[pos : pos + 4], "little")
        end = pos + 4 + body_size
        if end > size:
            raise EventLogMalformedError(
                f"event {seq} claims {body_size} bytes of data, {size - pos - 4} left"
            )
        if event_type not in EVENT_TYPES:
            unknown[_type_name(event_type)] = None
        if event_type == EV_NO_ACTION:
            if pcr == 0 and data[pos + 4 : pos + 20] == _STARTUP_LOCALITY:
                if body_size != 17:
                    raise EventLogMalformedError("StartupLocality event has the wrong size")
                locality = data[pos + 20]
        else:
            measured.append((pcr, digests))
        pos = end
        seq += 1
    # 2. Extend, now that the startup locality (PCR 0's initial value) is known.
    pcrs: dict[str, dict[int, bytes]] = {bank: {} for bank in replayable}
    hashers = [(bank, _HASHERS[bank], pcrs[bank]) for bank in replayable]
    extended: dict[int, list[bytes]] = {}
    for pcr, digests in measured:
        for bank, hasher, values in hashers:
            current = values.get(pcr)
            if current is None:
                current = _initial(pcr, _SIZES[bank], locality)
            values[pcr] = hasher(current + digests[bank]).digest()
        sha256 = digests.get("sha256")
        if sha256 is not None:
            extended.setdefault(pcr, []).append(sha256)
    return Replay(
        pcrs=pcrs,
        unknown_event_types=tuple(unknown),
        event_count=seq,
        extended={pcr: tuple(d) for pcr, d in extended.items()},
    )


@lru_cache(maxsize=256)  # at most 32 MiB of logs held
def _replay_cached(data: bytes, max_bytes: int, max_events: int) -> Replay:
    return _replay_direct(data, max_bytes, max_events)


def replay_bytes(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_events: int = DEFAULT_MAX_EVENTS
) -> Replay:
    """Parse and replay in one step; results for small logs are memoised by their bytes."""
    if len(data) <= _CACHEABLE_BYTES:
        return _replay_cached(data, max_bytes, max_events)
    return _replay_direct(data, max_bytes, max_events)


def check_replay(
    result: Replay, quoted: Mapping[str, Mapping[int, bytes]]
) -> frozenset[str]:
    """Every quoted PCR of a bank the log covers equals its replayed value.

    A quoted PCR the log never extends must still hold its initial value: a measurement the
    log does not explain is a mismatch, not a pass.  Returns the banks that were compared
    (and matched): only their digests are covered by the quote, so only they may be used
    by an allow-list.
    """
    banks: set[str] = set()
    compared = 0
    mismatched: list[str] = []
    for bank, values in quoted.items():
        if bank not in result.pcrs:
            continue
        replayed = result.pcrs[bank]
        for index, value in sorted(values.items()):
            expected = replayed.get(index)
            if expected is None:
                expected = bytes(len(value))
            compared += 1
            banks.add(bank)
            if not hmac.compare_digest(expected, value):
                mismatched.append(f"{bank}:{index}")
    if compared == 0:
        raise EventLogReplayMismatchError("the event log covers none of the quoted PCR banks")
    if mismatched:
        raise EventLogReplayMismatchError(
            "replaying the event log does not give the quoted PCRs " + ", ".join(mismatched)
        )
    return frozenset(banks)


def check_reference_digests(result: Replay, allowed: Mapping[int, Iterable[bytes]]) -> None:
    """Every event extended into a PCR the image pins by event digests is on its list.

    ``allowed`` maps a PCR to the SHA-256 event digests the publisher allows in it (the
    image manifest's ``event_digests``).  Together with the replay-equals-quote check this
    means nothing ran in those PCRs that the publisher did not name.
    """
    strays: list[str] = []
    for pcr, digests in sorted(allowed.items()):
        permitted = set(digests)
        strays.extend(
            f"{pcr}:{d.hex()[:16]}" for d in result.extended.get(pcr, ()) if d not in permitted
        )
    if strays:
        raise EventLogDigestNotAllowedError(
            "events the image does not allow were measured: " + ", ".join(strays[:16])
        )


class EventLogBuilder:
    """Writes a crypto-agile event log, for sandboxes and tests that measure a boot.

    ``add`` hashes the event data into each bank (or takes given digests) and returns them,
    so the caller can extend the same values into a real TPM.
    """

    def __init__(self, banks: tuple[str, ...] = ("sha256",), *, locality: int = 0) -> None:
        if not banks or any(b not in _SIZES for b in banks):
            raise ValueError("banks must be among sha1, sha256, sha384, sha512")
        self._banks = banks
        self._events: list[bytes] = []
        self._count = 0
        if locality:
            self._append(0, EV_NO_ACTION, _STARTUP_LOCALITY + bytes([locality]), None)

    @property
    def banks(self) -> tuple[str, ...]:
        return self._banks

    def _append(
        self, pcr: int, event_type: int, data: bytes, digests: Mapping[str, bytes] | None
    ) -> dict[str, bytes]:
        if digests is None:
            zero = event_type == EV_NO_ACTION
            digests = {
                b: bytes(_SIZES[b]) if zero else hashlib.new(b, data).digest() for b in self._banks
            }
        out = dict(digests)
        parts = [struct.pack("<III", pcr, event_type, len(self._banks))]
        for bank in self._banks:
            parts.append(struct.pack("<H", _ALG_IDS[bank]) + out[bank])
        parts.append(struct.pack("<I", len(data)) + data)
        self._events.append(b"".join(parts))
        return out

    def add(
        self,
        pcr: int,
        event_type: int,
        data: bytes,
        *,
        digests: Mapping[str, bytes] | None = None,
    ) -> dict[str, bytes]:
        """Record one event; returns the per-bank digests to extend into ``pcr``."""
        return self._append(pcr, event_type, data, digests)

    def to_bytes(self) -> bytes:
        """The whole log: the Spec ID header event then every event added."""
        spec = bytearray(_SPEC_ID_SIGNATURE)
        spec += struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(self._banks))
        for bank in self._banks:
            spec += struct.pack("<HH", _ALG_IDS[bank], _SIZES[bank])
        spec += b"\x00"
        header = struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec))
        return header + bytes(spec) + b"".join(self._events)
