"""C2SP checkpoints in the C2SP signed-note format, signed with Ed25519.

A checkpoint body is ``origin\\nsize\\nbase64(root)\\n``.  The signed note is the body, a blank
line, then one line per signature::

    — <key name> base64(key id || Ed25519 signature over the body)

with the key id the first four bytes of ``SHA-256(key name || 0x0A || 0x01 || public key)``
(0x01 is the signed-note type of Ed25519).  Pure: keys and text in, typed values out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sandboxsec.audit.errors import AuditCheckpointInvalidError, AuditCheckpointSignatureError
from sandboxsec.audit.merkle import HASH_SIZE
from sandboxsec.encoding import ascii_int, b64decode_strict

__all__ = [
    "Checkpoint",
    "SignedCheckpoint",
    "key_id",
    "parse_signed_checkpoint",
    "sign_checkpoint",
    "verifier_key",
    "verify_signed_checkpoint",
]

_ED25519_TYPE = b"\x01"
_SIG_PREFIX = "\u2014 "  # em dash and a space, as C2SP signed-note specifies


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 key under ``name``."""
    digest = hashlib.sha256(
        name.encode("utf-8") + b"\n" + _ED25519_TYPE + _raw_public(public_key)
    ).digest()
    return digest[:4]


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The signed-note verifier key string ``name+hex(key id)+base64(0x01 || public key)``."""
    blob = base64.b64encode(_ED25519_TYPE + _raw_public(public_key)).decode("ascii")
    return f"{name}+{key_id(name, public_key).hex()}+{blob}"


def _check_name(name: str) -> None:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise ValueError("a signed-note key name is non-empty, without spaces or '+'")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log's origin line, its size and its root hash."""

    origin: str
    size: int
    root_hash: bytes

    def body(self) -> str:
        """The checkpoint text that gets signed."""
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root_hash).decode()}\n"


@dataclass(frozen=True, slots=True)
class SignedCheckpoint:
    """A checkpoint and the full signed-note text that carries it."""

    checkpoint: Checkpoint
    note: str


def sign_checkpoint(
    checkpoint: Checkpoint, *, name: str, private_key: Ed25519PrivateKey
) -> SignedCheckpoint:
    """Sign ``checkpoint`` as a signed note under key ``name``."""
    _check_name(name)
    if "\n" in checkpoint.origin or not checkpoint.origin:
        raise ValueError("the origin is one non-empty line")
    body = checkpoint.body()
    sig = private_key.sign(body.encode("utf-8"))
    kid = key_id(name, private_key.public_key())
    line = f"{_SIG_PREFIX}{name} {base64.b64encode(kid + sig).decode('ascii')}\n"
    return SignedCheckpoint(checkpoint, f"{body}\n{line}")


def parse_signed_checkpoint(note: str) -> tuple[Checkpoint, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into its checkpoint and ``(name, key id, signature)`` lines.

    Raises :class:`AuditCheckpointInvalidError` when the text is not a checkpoint note.
    Signatures are *not* checked here; see :func:`verify_signed_checkpoint`.
    """
    # 1. The note is UTF-8 text: body, blank line, signature lines.
    try:
        note.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AuditCheckpointInvalidError("checkpoint note is not valid UTF-8 text") from exc
    body, sep, sigs = note.partition("\n\n")
    if not sep or not sigs.endswith("\n"):
        raise AuditCheckpointInvalidError("checkpoint note has no signature block")
    lines = body.split("\n")
    # 2. The body is origin, size, root and optional extension lines.
    if len(lines) < 3:
        raise AuditCheckpointInvalidError("checkpoint body needs origin, size and root lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not origin:
        raise AuditCheckpointInvalidError("checkpoint origin line is empty")
    try:
        # ASCII digits only: str.isdigit() also holds for "²", which int() then refuses.
        size = ascii_int(size_text)
    except ValueError:
        raise AuditCheckpointInvalidError("checkpoint size is not a canonical decimal") from None
    try:
        root = b64decode_strict(root_text)
    except (binascii.Error, ValueError) as exc:
        raise AuditCheckpointInvalidError("checkpoint root hash is not base64") from exc
    if len(root) != HASH_SIZE:
        raise AuditCheckpointInvalidError("checkpoint root hash is not 32 bytes")
    # 3. Each signature line is "— name base64(keyid || sig)".
    parsed: list[tuple[str, bytes, bytes]] = []
    for line in sigs[:-1].split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise AuditCheckpointInvalidError("checkpoint signature line is malformed")
        name, _, blob = line[len(_SIG_PREFIX) :].partition(" ")
        try:
            raw = b64decode_strict(blob)
        except (binascii.Error, ValueError) as exc:
            raise AuditCheckpointInvalidError("checkpoint signature is not base64") from exc
        if not name or len(raw) < 5:
            raise AuditCheckpointInvalidError("checkpoint signature line is malformed")
        parsed.append((name, raw[:4], raw[4:]))
    return Checkpoint(origin, size, root), parsed


def verify_signed_checkpoint(
    note: str, public_key: Ed25519PublicKey, *, origin: str | None = None, name: str | None = None
) -> Checkpoint:
    """Return the checkpoint if a signature line verifies under ``public_key``.

    ``name`` pins the key name (otherwise any line whose key id matches the key under its own
    name is tried); ``origin`` pins the log.  Raises :class:`AuditCheckpointSignatureError` or
    :class:`AuditCheckpointInvalidError`.
    """
    checkpoint, sigs = parse_signed_checkpoint(note)
    if origin is not None and checkpoint.origin != origin:
        raise AuditCheckpointInvalidError(
            f"checkpoint is for log {checkpoint.origin!r}, expected {origin!r}"
        )
    body = note.partition("\n\n")[0] + "\n"
    message = body.encode("utf-8")
    for sig_name, kid, sig in sigs:
        if name is not None and sig_name != name:
            continue
        # Signatures by other keys are allowed (witness cosignatures); only ours must verify.
        if kid != key_id(sig_name, public_key):
            continue
        try:
            public_key.verify(sig, message)
        except InvalidSignature as exc:
            raise AuditCheckpointSignatureError(
                f"checkpoint of size {checkpoint.size} has a bad signature by {sig_name}"
            ) from exc
        return checkpoint
    raise AuditCheckpointSignatureError(
        f"checkpoint of size {checkpoint.size} is not signed by the trusted audit key"
    )
