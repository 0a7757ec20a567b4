"""Sealed records: AES-256-GCM under a key-committed data key, bound to where the record lives.

Byte layout of a sealed record (format 1; all integers big-endian)::

    offset  size  field
    0       1     format version, 0x01
    1       1     suite, 0x01 = AES-256-GCM, HKDF-SHA256 key derivation, key commitment
    2       16    data key (DEK) id
    18      32    key commitment = HKDF-SHA256(DEK, salt=DEK id, info="sandboxsec/v1/commit")
    50      12    random nonce
    62      n+16  AES-256-GCM ciphertext and tag, key = HKDF-SHA256(DEK, DEK id, ".../encrypt")

The GCM associated data is the 62-byte header followed by a *context*
(:func:`encode_context`) naming the tenant, session, record and part the ciphertext belongs
to, so a ciphertext copied into another row or tenant does not open.  The commitment is
checked before decryption; it is what makes one ciphertext open under one key only (AES-GCM
alone does not commit to its key).

Wrapped keys (a DEK under a KEK, a KEK under a local root key) use :func:`wrap_secret`::

    0x01 | nonce (12) | AES-256-GCM(wrapping key, secret, aad) with tag (len(secret) + 16)

This module is pure: keys and bytes in, bytes or :class:`DecryptionFailedError` out.
"""

from __future__ import annotations

import hmac
import os
import struct
import threading
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sandboxsec.crypto.errors import DecryptionFailedError

__all__ = [
    "DEK_ID_BYTES",
    "HEADER_BYTES",
    "KEY_BYTES",
    "MAX_SEAL_BYTES",
    "OVERHEAD_BYTES",
    "DataKey",
    "SealedHeader",
    "encode_context",
    "open_sealed",
    "parse_header",
    "seal",
    "unwrap_secret",
    "wrap_secret",
]

FORMAT_SEALED = 0x01
SUITE_AES256GCM_HKDF_COMMIT = 0x01
KEY_BYTES = 32
DEK_ID_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
COMMITMENT_BYTES = 32
HEADER_BYTES = 2 + DEK_ID_BYTES + COMMITMENT_BYTES + NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES
#: pyca's AEAD refuses larger inputs; anything bigger goes through :mod:`sandboxsec.crypto.stream`.
MAX_SEAL_BYTES = 2**31 - 1

_WRAP_FORMAT = 0x01
_INFO_ENCRYPT = b"sandboxsec/v1/encrypt"
_INFO_COMMIT = b"sandboxsec/v1/commit"
_INFO_STREAM = b"sandboxsec/v1/stream"


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True, slots=True, repr=False)
class DataKey:
    """An unwrapped data key with its derived sub-keys (derived once, reused per record).

    ``repr`` never shows key material, so a DataKey in a log line or traceback leaks nothing.
    """

    dek_id: bytes
    commitment: bytes
    _material: bytes = field(compare=False)
    _aead: AESGCM = field(compare=False)
    #: The sealed-record header up to the nonce: the same for every record under this key.
    _prefix: bytes = field(compare=False)

    @classmethod
    def from_material(cls, dek_id: bytes, material: bytes) -> DataKey:
        """Derive the encryption key and the commitment of DEK ``material`` (32 bytes)."""
        if len(dek_id) != DEK_ID_BYTES or len(material) != KEY_BYTES:
            raise ValueError("a data key is a 16-byte id and 32 bytes of key material")
        enc = _hkdf(material, dek_id, _INFO_ENCRYPT)
        commitment = _hkdf(material, dek_id, _INFO_COMMIT)
        prefix = bytes([FORMAT_SEALED, SUITE_AES256GCM_HKDF_COMMIT]) + dek_id + commitment
        return cls(dek_id, commitment, material, AESGCM(enc), prefix)

    @classmethod
    def generate(cls) -> DataKey:
        """A fresh random data key with a random id."""
        return cls.from_material(os.urandom(DEK_ID_BYTES), AESGCM.generate_key(256))

    @property
    def material(self) -> bytes:
        """The raw key material, for wrapping only."""
        return self._material

    def stream_key(self, salt: bytes, context: bytes) -> AESGCM:
        """The per-stream key: HKDF of the DEK with the stream's salt and associated data."""
        return AESGCM(_hkdf(self._material, salt, _INFO_STREAM + context))

    def __repr__(self) -> str:
        return f"DataKey(dek_id={self.dek_id.hex()})"


@dataclass(frozen=True, slots=True)
class SealedHeader:
    """The clear header of a sealed record."""

    dek_id: bytes
    commitment: bytes
    nonce: bytes


def encode_context(*fields: str) -> bytes:
    """Length-prefixed UTF-8 fields: unambiguous, so ("ab", "c") never equals ("a", "bc")."""
    parts: list[bytes] = []
    for value in fields:
        raw = value.encode()
        parts.append(struct.pack(">I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


#: Above this size the ciphertext is written in place instead of concatenated to the header.
_IN_PLACE_BYTES = 64 * 1024
_NONCE_POOL_BYTES = NONCE_BYTES * 512


class _NoncePool(threading.local):
    """Random nonces cut from larger reads of the OS random source (one read per 512 nonces,
    per thread).  Each nonce is 12 fresh random bytes, exactly as with one read each."""

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0

    def take(self) -> bytes:
        pos = self.pos
        if pos >= len(self.buf):
            self.buf, pos = os.urandom(_NONCE_POOL_BYTES), 0
        self.pos = pos + NONCE_BYTES
        return self.buf[pos : pos + NONCE_BYTES]


_nonces = _NoncePool()


def _forget_nonces_after_fork() -> None:
    # A forked child must never reuse random bytes its parent will also use.
    global _nonces
    _nonces = _NoncePool()


os.register_at_fork(after_in_child=_forget_nonces_after_fork)


def seal(key: DataKey, plaintext: bytes | memoryview, context: bytes) -> bytes | bytearray:
    """Encrypt ``plaintext`` under ``key`` bound to ``context``; returns header and ciphertext.

    The caller bounds the number of seals per key (random nonces; see ``keyring``).  A large
    record is encrypted in place into one buffer, so it is never copied after encryption.
    """
    if len(plaintext) > MAX_SEAL_BYTES:
        raise ValueError("record too large for a single seal; use the streaming format")
    nonce = _nonces.take()
    header = key._prefix + nonce
    if len(plaintext) < _IN_PLACE_BYTES:
        return header + key._aead.encrypt(nonce, plaintext, header + context)
    out = bytearray(HEADER_BYTES + len(plaintext) + TAG_BYTES)
    out[:HEADER_BYTES] = header
    with memoryview(out) as view:
        key._aead.encrypt_into(nonce, plaintext, header + context, view[HEADER_BYTES:])
    return out


def parse_header(blob: bytes | bytearray | memoryview) -> SealedHeader:
    """Read the clear header of a sealed record (to find its data key) without decrypting."""
    if (
        len(blob) < OVERHEAD_BYTES
        or blob[0] != FORMAT_SEALED
        or blob[1] != SUITE_AES256GCM_HKDF_COMMIT
    ):
        raise DecryptionFailedError()
    return SealedHeader(bytes(blob[2:18]), bytes(blob[18:50]), bytes(blob[50:HEADER_BYTES]))


def open_sealed(key: DataKey, blob: bytes | bytearray | memoryview, context: bytes) -> bytes:
    """Decrypt and authenticate a sealed record; any failure is :class:`DecryptionFailedError`.

    1. the header is well formed and names this key;
    2. the stored commitment equals the key's commitment (constant time);
    3. the GCM tag verifies over header, context and ciphertext.
    """
    header = parse_header(blob)
    if header.dek_id != key.dek_id:
        raise DecryptionFailedError()
    if not hmac.compare_digest(header.commitment, key.commitment):
        raise DecryptionFailedError()
    view = memoryview(blob)
    aad = bytes(view[:HEADER_BYTES]) + context
    try:
        return key._aead.decrypt(header.nonce, view[HEADER_BYTES:], aad)
    except InvalidTag:
        raise DecryptionFailedError() from None


def wrap_secret(wrapping_key: bytes, secret: bytes, aad: bytes) -> bytes:
    """Encrypt a key under another key (AES-256-GCM, random nonce, ``aad`` bound)."""
    nonce = os.urandom(NONCE_BYTES)
    return bytes([_WRAP_FORMAT]) + nonce + AESGCM(wrapping_key).encrypt(nonce, secret, aad)


def unwrap_secret(wrapping_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Reverse :func:`wrap_secret`; any failure is :class:`DecryptionFailedError`."""
    if len(wrapped) < 1 + NONCE_BYTES + TAG_BYTES or wrapped[0] != _WRAP_FORMAT:
        raise DecryptionFailedError()
    try:
        return AESGCM(wrapping_key).decrypt(wrapped[1 : 1 + NONCE_BYTES], wrapped[13:], aad)
    except InvalidTag:
        raise DecryptionFailedError() from None
