"""Streaming AEAD for large records (screenshots, recordings): constant memory, any length.

Byte layout of a stream (format 2; integers big-endian)::

    header (93 bytes)
      0    1   format version, 0x02
      1    1   suite, 0x02 = AES-256-GCM segments, per-stream HKDF-SHA256 key, key commitment
      2    16  data key (DEK) id
      18   32  key commitment of the DEK (as in a sealed record)
      50   4   segment size S: plaintext bytes in every segment but the last
      54   32  random salt
      86   7   random nonce prefix
    segments
      segment i: AES-256-GCM(stream key, nonce_i, plaintext_i, aad=header) with 16-byte tag;
      every segment holds S plaintext bytes except the last, which holds 0..S.

The stream key is HKDF-SHA256(DEK, salt, "sandboxsec/v1/stream" || context), so the context
(tenant, session, record) is bound through the key.  ``nonce_i = prefix || uint32(i) ||
last`` where ``last`` is 0x01 on the final segment and 0x00 otherwise: a dropped, repeated or
reordered segment changes a nonce and fails, and a stream cut at a segment boundary fails
because its new final segment was sealed with ``last = 0``.

Decryption yields plaintext segment by segment; a consumer must discard what it received
if the iterator raises :class:`DecryptionFailedError` (truncation is only known at the end).
"""

from __future__ import annotations

import hmac
import itertools
import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag

from sandboxsec.crypto.envelope import COMMITMENT_BYTES, DEK_ID_BYTES, DataKey
from sandboxsec.crypto.errors import DecryptionFailedError

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "STREAM_HEADER_BYTES",
    "StreamHeader",
    "open_stream",
    "read_stream_header",
    "seal_stream",
    "sealed_stream_length",
]

FORMAT_STREAM = 0x02
SUITE_STREAM = 0x02
TAG_BYTES = 16
SALT_BYTES = 32
PREFIX_BYTES = 7
STREAM_HEADER_BYTES = 2 + DEK_ID_BYTES + COMMITMENT_BYTES + 4 + SALT_BYTES + PREFIX_BYTES
#: 1 MiB segments: few tags per megabyte, small enough for constant-memory streaming.
DEFAULT_SEGMENT_BYTES = 1 << 20
MIN_SEGMENT_BYTES = 1 << 10
MAX_SEGMENT_BYTES = 1 << 26
_MAX_SEGMENTS = 2**32


class StreamHeader:
    """The parsed clear header of a stream."""

    __slots__ = ("commitment", "dek_id", "prefix", "raw", "salt", "segment_bytes")

    def __init__(self, raw: bytes) -> None:
        if (
            len(raw) != STREAM_HEADER_BYTES
            or raw[0] != FORMAT_STREAM
            or raw[1] != SUITE_STREAM
        ):
            raise DecryptionFailedError()
        self.raw = raw
        self.dek_id = raw[2:18]
        self.commitment = raw[18:50]
        (self.segment_bytes,) = struct.unpack(">I", raw[50:54])
        self.salt = raw[54:86]
        self.prefix = raw[86:93]
        if not MIN_SEGMENT_BYTES <= self.segment_bytes <= MAX_SEGMENT_BYTES:
            raise DecryptionFailedError()


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index >= _MAX_SEGMENTS:
        raise ValueError("stream too long for its segment counter")
    return prefix + struct.pack(">IB", index, 1 if last else 0)


def sealed_stream_length(plaintext_bytes: int, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> int:
    """The exact size of the stream :func:`seal_stream` makes for this many plaintext bytes."""
    segments = plaintext_bytes // segment_bytes + 1
    return STREAM_HEADER_BYTES + plaintext_bytes + segments * TAG_BYTES


Chunk = bytes | bytearray | memoryview


def _split(chunks: Iterable[Chunk], size: int) -> Iterator[tuple[Chunk, bool]]:
    """Cut chunks into pieces of exactly ``size`` bytes, then one shorter tail (maybe empty).

    Yields ``(piece, is_tail)``.  A piece lying within one input chunk is a view of it (no
    copy); a piece spanning chunks is assembled in a fresh buffer, so a caller that reuses
    its buffer between chunks cannot change a piece that is still held.
    """
    partial = bytearray()
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        if partial:
            take = min(size - len(partial), len(view))
            partial += view[:take]
            view = view[take:]
            if len(partial) < size:
                continue
            yield partial, False
            partial = bytearray()
        while len(view) >= size:
            yield view[:size], False
            view = view[size:]
        if len(view):
            partial = bytearray(view)
    yield partial, True


def seal_stream(
    key: DataKey,
    chunks: Iterable[Chunk],
    context: bytes,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> Iterator[bytes]:
    """Encrypt chunks of any sizes; yields the header, then one ciphertext per segment.

    Every full segment is sealed as soon as it is complete, and the stream always ends with
    a shorter final segment (empty when the length is a multiple of the segment size), so
    nothing is held back to look ahead: at most one segment is buffered, and none when the
    input chunks are segment-aligned.
    """
    if not MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES:
        raise ValueError("segment size out of range")
    salt = os.urandom(SALT_BYTES)
    prefix = os.urandom(PREFIX_BYTES)
    header = (
        bytes([FORMAT_STREAM, SUITE_STREAM])
        + key.dek_id
        + key.commitment
        + struct.pack(">I", segment_bytes)
        + salt
        + prefix
    )
    aead = key.stream_key(salt, context)
    yield header
    for index, (piece, tail) in enumerate(_split(chunks, segment_bytes)):
        yield aead.encrypt(_nonce(prefix, index, tail), piece, header)


def read_stream_header(first: bytes) -> StreamHeader:
    """Parse a stream header (to look up its data key) without decrypting anything."""
    return StreamHeader(bytes(first[:STREAM_HEADER_BYTES]))


def open_stream(
    resolve_key: Callable[[bytes], DataKey],
    chunks: Iterable[Chunk],
    context: bytes,
) -> Iterator[bytes]:
    """Decrypt a stream given as chunks of any sizes; yields plaintext segment by segment.

    ``resolve_key(dek_id)`` returns the data key named in the header.  Checks, in order:

    1. the header is well formed;
    2. the key's commitment equals the header's (constant time);
    3. each segment's tag verifies with its index and last-segment flag in the nonce;
    4. the stream ends exactly after the segment sealed as last.
    """
    source = iter(chunks)
    head = bytearray()
    for chunk in source:
        head += chunk
        if len(head) >= STREAM_HEADER_BYTES:
            break
    header = StreamHeader(bytes(head[:STREAM_HEADER_BYTES]))
    key = resolve_key(header.dek_id)
    if key.dek_id != header.dek_id or not hmac.compare_digest(key.commitment, header.commitment):
        raise DecryptionFailedError()
    aead = key.stream_key(header.salt, context)
    rest = itertools.chain((head[STREAM_HEADER_BYTES:],), source)

    def _open(index: int, data: Chunk, last: bool) -> bytes:
        try:
            return aead.decrypt(_nonce(header.prefix, index, last), data, header.raw)
        except InvalidTag:
            raise DecryptionFailedError() from None

    # Which segment is the last is known only when the next piece (or the end) arrives, so
    # one full segment is held back; it is copied unless it is a view of immutable bytes.
    held: Chunk | None = None
    index = 0
    for piece, tail in _split(rest, header.segment_bytes + TAG_BYTES):
        if tail:
            if not piece:
                if held is None:
                    raise DecryptionFailedError()
                yield _open(index, held, True)
                return
            if held is not None:
                yield _open(index, held, False)
                index += 1
            if len(piece) < TAG_BYTES:
                raise DecryptionFailedError()
            yield _open(index, piece, True)
            return
        if held is not None:
            yield _open(index, held, False)
            index += 1
        is_bytes_view = isinstance(piece, memoryview) and isinstance(piece.obj, bytes)
        held = piece if is_bytes_view else bytes(piece)
