"""C2SP tlog-cosignature v1 (Ed25519, signed-note type 0x04): witness statements on checkpoints.

A cosignature line is a signed-note signature line::

    — <witness name> base64(key id || u64 big-endian timestamp || Ed25519 signature)

with the key id ``SHA-256(name || 0x0A || 0x04 || public key)[:4]`` and the signature over::

    cosignature/v1
    time <timestamp>
    <the checkpoint body: origin, size, root lines>

A v1 cosignature says: as of ``timestamp``, the largest consistent tree the witness has seen for
this origin has this root.  The name is not signed, so one key serves one witness.  Pure: keys,
text and times in, typed values out.  ML-DSA-44 cosignatures (type 0x06) are recognised by their
key id only through the configured keys: a line whose (name, key id) matches no configured key
is ignored, as signed-note requires.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sandboxsec.audit.checkpoint import Checkpoint
from sandboxsec.audit.errors import (
    AuditCheckpointInvalidError,
    AuditCosignatureInvalidError,
)
from sandboxsec.encoding import b64decode_strict

__all__ = [
    "COSIGNATURE_TYPE",
    "Cosignature",
    "WitnessKey",
    "cosign",
    "cosigned_message",
    "parse_cosignature_line",
    "parse_witness_key",
    "signature_lines",
    "verify_cosignatures",
]

#: The signed-note signature type of Ed25519 cosignature/v1.
COSIGNATURE_TYPE = 0x04
_SIG_PREFIX = "\u2014 "
#: A timestamp must fit in 63 bits (tlog-cosignature).
_MAX_TIMESTAMP = 2**63 - 1


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    data = name.encode("utf-8") + b"\n" + bytes([COSIGNATURE_TYPE]) + _raw(public_key)
    return hashlib.sha256(data).digest()[:4]


@dataclass(frozen=True, slots=True)
class WitnessKey:
    """A witness as a verifier knows it: its name and Ed25519 cosigning key."""

    name: str
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        """The 4-byte signed-note key id of this witness (type 0x04)."""
        return _key_id(self.name, self.public_key)

    def vkey(self) -> str:
        """The signed-note verifier key ``name+hex(key id)+base64(0x04 || public key)``."""
        blob = base64.b64encode(bytes([COSIGNATURE_TYPE]) + _raw(self.public_key)).decode()
        return f"{self.name}+{self.key_id.hex()}+{blob}"

    @classmethod
    def from_private(cls, name: str, private_key: Ed25519PrivateKey) -> WitnessKey:
        """The public side of a witness's own key."""
        _check_name(name)
        return cls(name, private_key.public_key())


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ValueError("a signed-note key name is non-empty, without spaces or '+'")


def parse_witness_key(vkey: str) -> WitnessKey:
    """Parse a witness verifier key ``name+keyid+base64(0x04 || key)``.

    Raises ``ValueError`` for anything else (another signature type, a key id that does not
    match the key, non-canonical hex or base64).
    """
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise ValueError("a witness key is name+keyid+base64(key)")
    name, kid_hex, blob = parts
    _check_name(name)
    if len(kid_hex) != 8 or kid_hex != kid_hex.lower():
        raise ValueError("the key id is not 8 lower-case hex digits")
    try:
        kid = bytes.fromhex(kid_hex)
        raw = b64decode_strict(blob)
    except (ValueError, binascii.Error) as exc:
        raise ValueError("the witness key is not hex and base64") from exc
    if len(raw) != 33 or raw[0] != COSIGNATURE_TYPE:
        raise ValueError("the witness key is not an Ed25519 cosignature/v1 key (type 0x04)")
    key = WitnessKey(name, Ed25519PublicKey.from_public_bytes(raw[1:]))
    if key.key_id != kid:
        raise ValueError("the witness key's id does not match its key")
    return key


def cosigned_message(body: str, timestamp: int) -> bytes:
    """The bytes a v1 cosignature signs: header, time line, then the checkpoint body."""
    if not 0 <= timestamp <= _MAX_TIMESTAMP:
        raise ValueError("a cosignature timestamp is between 0 and 2^63-1")
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosign(
    checkpoint: Checkpoint, *, name: str, private_key: Ed25519PrivateKey, timestamp: int
) -> str:
    """One cosignature line (with its newline) on ``checkpoint`` at ``timestamp`` (POSIX s)."""
    _check_name(name)
    sig = private_key.sign(cosigned_message(checkpoint.body(), timestamp))
    kid = _key_id(name, private_key.public_key())
    blob = base64.b64encode(kid + struct.pack(">Q", timestamp) + sig).decode()
    return f"{_SIG_PREFIX}{name} {blob}\n"


@dataclass(frozen=True, slots=True)
class Cosignature:
    """A verified cosignature: who, when, on which tree."""

    witness: str
    key_id: bytes
    timestamp: int
    size: int
    root_hash: bytes
    line: str


def signature_lines(text: str) -> list[str]:
    """The signature lines (each with its newline) of a response body or a note's tail.

    Raises :class:`AuditCheckpointInvalidError` when a line is not a signature line.
    """
    out = []
    for line in text.splitlines(keepends=True):
        if not line.startswith(_SIG_PREFIX) or not line.endswith("\n"):
            raise AuditCheckpointInvalidError("a cosignature line is malformed")
        out.append(line)
    return out


def _split(line: str) -> tuple[str, bytes]:
    name, _, blob = line[len(_SIG_PREFIX) :].rstrip("\n").partition(" ")
    try:
        raw = b64decode_strict(blob)
    except (binascii.Error, ValueError) as exc:
        raise AuditCheckpointInvalidError("a cosignature is not base64") from exc
    if not name or len(raw) < 4:
        raise AuditCheckpointInvalidError("a cosignature line is malformed")
    return name, raw


def parse_cosignature_line(line: str) -> tuple[str, bytes, int, bytes]:
    """``(name, key id, timestamp, signature)`` of an Ed25519 cosignature line, unverified.

    For display and diagnosis only; :func:`verify_cosignatures` is what establishes trust.
    """
    name, raw = _split(line)
    if len(raw) != 4 + 8 + 64:
        raise AuditCheckpointInvalidError("not an Ed25519 cosignature (76 bytes)")
    (timestamp,) = struct.unpack(">Q", raw[4:12])
    return name, raw[:4], timestamp, raw[12:]


def verify_cosignatures(
    checkpoint: Checkpoint,
    lines: Iterable[str],
    witnesses: Sequence[WitnessKey],
    *,
    not_after: int | None = None,
) -> list[Cosignature]:
    """The cosignatures among ``lines`` that verify under ``witnesses``, one per witness.

    Lines of unknown (name, key id) pairs are ignored (they may be other witnesses' or the
    log's own).  A line that claims a configured witness but does not verify raises
    :class:`AuditCosignatureInvalidError`: someone forged or altered it.  ``not_after`` (POSIX
    seconds) refuses cosignatures dated in the future.
    """
    message_body = checkpoint.body()
    by_id = {(w.name, w.key_id): w for w in witnesses}
    found: dict[str, Cosignature] = {}
    for line in lines:
        name, raw = _split(line)
        w = by_id.get((name, raw[:4]))
        if w is None:
            continue
        if len(raw) != 4 + 8 + 64:
            raise AuditCosignatureInvalidError(
                f"the cosignature by {name} on size {checkpoint.size} is not 76 bytes"
            )
        (timestamp,) = struct.unpack(">Q", raw[4:12])
        try:
            w.public_key.verify(raw[12:], cosigned_message(message_body, timestamp))
        except (InvalidSignature, ValueError) as exc:
            raise AuditCosignatureInvalidError(
                f"the cosignature by {name} on the checkpoint of size {checkpoint.size} does "
                "not verify"
            ) from exc
        if not_after is not None and timestamp > not_after:
            raise AuditCosignatureInvalidError(
                f"the cosignature by {name} is dated in the future ({timestamp})"
            )
        found.setdefault(
            w.name, Cosignature(w.name, w.key_id, timestamp, checkpoint.size,
                                checkpoint.root_hash, line)
        )
    return list(found.values())
