"""The canonical bytes of one audit entry: exactly what the Merkle leaf hashes.

An entry is one line of ASCII JSON with a fixed key order and no insignificant whitespace::

    {"v":1,"log":L,"seq":N,"prev":H,"time":T,"tenant":TID,"actor":{"key_id":K,"role":R},
     "event":E,"outcome":O,"reason":C,"object_ids":{...},"body":{...},"hmac":{...}}

(shown wrapped; the real line has no newline).  Nested objects have sorted keys, non-ASCII is
``\\u`` escaped, and NaN/Infinity are refused, so one record has one encoding.  ``prev`` is the
hex leaf hash of the previous entry of the same log (64 zeros for the first), which lets a
verifier name the first altered entry instead of only the checkpoint that no longer matches.

Verifiers never re-encode: they hash the exact stored line.  Because ``log`` and ``seq`` come
first, a verifier finds them with a prefix comparison instead of a JSON parse.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from json.encoder import encode_basestring_ascii as _encode_str
from typing import Any

from sandboxsec.audit.merkle import leaf_hash
from sandboxsec.audit.record import AuditRecord
from sandboxsec.clock import rfc3339

__all__ = [
    "ENTRY_VERSION",
    "GENESIS_PREV",
    "EncodedEntry",
    "canonical_json",
    "encode_entry",
    "encode_tail",
    "entry_line",
    "entry_prefix",
    "hmac_value",
]

ENTRY_VERSION = 1
#: ``prev`` of the first entry of every log.
GENESIS_PREV = "0" * 64
#: Label of HMAC'd values, so a future algorithm change is visible in the entry itself.
_HMAC_LABEL = "hmac-sha256:"


def _default(value: Any) -> Any:
    # Callers pass dataclass-ish values in bodies; map the common ones to stable JSON.
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, tuple):
        return list(value)
    # Anything else is recorded by its text rather than dropped: nothing is lost.
    return str(value)


_ENCODER = json.JSONEncoder(
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=True,
    allow_nan=False,
    default=_default,
)


def canonical_json(value: Any) -> str:
    """Deterministic ASCII JSON: sorted keys, no whitespace, no NaN, ``\\u`` escapes."""
    # One shared encoder: building a new one per call costs more than the encoding itself.
    return _ENCODER.encode(value)


def hmac_value(key: bytes, value: Any) -> str:
    """The stored form of a sensitive value: ``hmac-sha256:<hex>``.

    Strings are MACed as their UTF-8 bytes; every other type (numbers, booleans, lists) as its
    canonical JSON, so no type escapes the MAC the way Vault's audit lets integers through.
    """
    data = value.encode("utf-8") if isinstance(value, str) else canonical_json(value).encode()
    mac = _keyed(key).copy()
    mac.update(data)
    return _HMAC_LABEL + mac.hexdigest()


@functools.lru_cache(maxsize=256)
def _keyed(key: bytes) -> hmac.HMAC:
    # The key schedule (both padded key blocks absorbed) is done once per key and copied per
    # value: a third of the cost of a one-shot HMAC on these short values.
    return hmac.new(key, digestmod="sha256")


def entry_prefix(log_id: str) -> bytes:
    """The bytes every entry line of ``log_id`` starts with, up to and including ``"seq":``."""
    return f'{{"v":{ENTRY_VERSION},"log":{canonical_json(log_id)},"seq":'.encode("ascii")


@dataclass(frozen=True, slots=True)
class EncodedEntry:
    """One sequenced entry: its canonical line and that line's leaf hash."""

    log_id: str
    seq: int
    line: bytes
    leaf_hash: bytes


def encode_entry(
    record: AuditRecord,
    *,
    log_id: str,
    seq: int,
    prev: bytes | None,
    now: datetime,
    hmac_key: bytes,
) -> EncodedEntry:
    """Sequence ``record`` as entry ``seq`` of ``log_id`` and return its canonical bytes.

    ``prev`` is the previous entry's leaf hash (None for the first entry).  ``hmac_key`` is the
    log's audit key; every ``record.sensitive`` value is replaced by its MAC.
    """
    line = entry_line(log_id=log_id, seq=seq, prev=prev, now=now,
                      tail=encode_tail(record, hmac_key=hmac_key))
    return EncodedEntry(log_id=log_id, seq=seq, line=line, leaf_hash=leaf_hash(line))


def encode_tail(record: AuditRecord, *, hmac_key: bytes) -> str:
    """Everything of ``record``'s entry line after ``"time":…,``: what does not depend on
    where the entry lands in its log.

    An append intent stores this text, so the record's content and MACs are fixed when the
    caller's transaction commits; :func:`entry_line` later puts it at its sequence number.
    """
    macs = {name: hmac_value(hmac_key, value) for name, value in record.sensitive.items()}
    macs_json = _flat_json(macs) if all(type(k) is str for k in macs) else canonical_json(macs)
    q = _quote
    # Fixed top-level order (documented in docs/audit.md); nested objects sorted.  Plain
    # strings are quoted directly: the same bytes canonical_json gives, without its dispatch.
    return (
        f'"tenant":{q(record.tenant_id)},'
        f'"actor":{{"key_id":{q(record.actor_key_id)},"role":{q(record.actor_role)}}},'
        f'"event":{q(record.event)},"outcome":{q(record.outcome)},"reason":{q(record.reason)},'
        f'"object_ids":{_flat_json(_str_map(record.object_ids))},'
        f'"body":{_body_json(record.body)},"hmac":{macs_json}}}'
    )


def entry_line(
    *, log_id: str, seq: int, prev: bytes | None, now: datetime, tail: str
) -> bytes:
    """The canonical line of the entry ``seq`` of ``log_id`` whose record encodes to ``tail``
    (:func:`encode_tail`); ``prev`` is the previous entry's leaf hash (None for the first)."""
    if seq < 0:
        raise ValueError("sequence numbers start at 0")
    prev_hex = GENESIS_PREV if prev is None else prev.hex()
    text = (
        f'{{"v":{ENTRY_VERSION},"log":{_quote(log_id)},"seq":{seq},"prev":"{prev_hex}",'
        f'"time":"{_time_text(now)}",{tail}'
    )
    return text.encode("ascii")


@functools.lru_cache(maxsize=64)
def _time_text(now: datetime) -> str:
    # A batch shares one time; formatting it once per batch instead of once per entry.
    return rfc3339(now)


def _quote(value: Any) -> str:
    """A JSON string (ASCII, escaped) or ``null``; enums by value, other types as text."""
    if type(value) is str:
        return _encode_str(value)
    if value is None:
        return "null"
    return _encode_str(_text(value) or "")


def _flat_json(values: Mapping[str, str]) -> str:
    """``canonical_json`` of a map of strings to strings (keys sorted, ASCII escapes), built
    directly: the encoder's per-call set-up cost more than these small objects."""
    q = _encode_str
    return "{" + ",".join([q(k) + ":" + q(v) for k, v in sorted(values.items())]) + "}"


def _body_json(body: Mapping[str, Any]) -> str:
    try:
        return canonical_json(dict(body))
    except ValueError:
        # NaN or infinity somewhere: JSON has no such numbers.  Record them as text rather
        # than refuse the entry (and with it the caller's action).
        return canonical_json(_finite(dict(body)))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_finite(v) for v in value]
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def _str_map(values: Mapping[str, Any]) -> dict[str, str]:
    return {
        k if type(k) is str else str(k): v if type(v) is str else str(_text(v))
        for k, v in values.items()
    }
