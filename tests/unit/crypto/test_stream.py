"""Streaming format: constant-size segments, truncation, reordering, extension all fail."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.crypto.envelope import DataKey, encode_context
from sandboxsec.crypto.errors import DecryptionFailedError
from sandboxsec.crypto.stream import (
    STREAM_HEADER_BYTES,
    open_stream,
    read_stream_header,
    seal_stream,
    sealed_stream_length,
)

KEY = DataKey.generate()
CTX = encode_context("tn_a", "ss_1", "tr_1", "data", "screenshot")
SEG = 1024


def _seal(data: bytes, seg: int = SEG) -> list[bytes]:
    return list(seal_stream(KEY, [data], CTX, segment_bytes=seg))


def _open(parts: list[bytes], ctx: bytes = CTX, key: DataKey = KEY) -> bytes:
    return b"".join(open_stream(lambda _id: key, parts, ctx))


@given(
    st.binary(max_size=5 * SEG),
    st.lists(st.integers(1, 3000), min_size=1, max_size=8),
)
@settings(max_examples=60, deadline=None)
def test_round_trip_any_chunking(data: bytes, cuts: list[int]) -> None:
    # Input and ciphertext are split at arbitrary points: the format does not depend on it.
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(data[pos : pos + n])
        pos += n
    chunks.append(data[pos:])
    blob = b"".join(seal_stream(KEY, chunks, CTX, segment_bytes=SEG))
    assert len(blob) == sealed_stream_length(len(data), SEG)
    pieces = [blob[i : i + cuts[0]] for i in range(0, len(blob), cuts[0])]
    assert _open(pieces) == data


def test_header_layout() -> None:
    parts = _seal(b"x" * 3000)
    header = read_stream_header(parts[0])
    assert len(parts[0]) == STREAM_HEADER_BYTES
    assert header.dek_id == KEY.dek_id and header.segment_bytes == SEG
    assert [len(p) for p in parts[1:]] == [SEG + 16, SEG + 16, 3000 - 2 * SEG + 16]


def test_exact_multiple_ends_with_empty_last_segment() -> None:
    parts = _seal(b"y" * (2 * SEG))
    assert [len(p) for p in parts[1:]] == [SEG + 16, SEG + 16, 16]
    assert _open(parts) == b"y" * (2 * SEG)
    # The tag-only final segment dropped: the stream now ends on a non-final segment.
    with pytest.raises(DecryptionFailedError):
        _open(parts[:-1])


def test_reused_input_buffer_is_not_aliased() -> None:
    # A caller reading into one buffer again and again must still get a correct stream.
    data = os.urandom(5 * SEG + 300)
    buf = bytearray(700)

    def reader() -> object:
        for i in range(0, len(data), 700):
            piece = data[i : i + 700]
            buf[: len(piece)] = piece
            yield memoryview(buf)[: len(piece)]

    blob = b"".join(seal_stream(KEY, reader(), CTX, segment_bytes=SEG))  # type: ignore[arg-type]
    assert _open([blob]) == data
    cbuf = bytearray(333)

    def creader() -> object:
        for i in range(0, len(blob), 333):
            piece = blob[i : i + 333]
            cbuf[: len(piece)] = piece
            yield memoryview(cbuf)[: len(piece)]

    assert b"".join(open_stream(lambda _id: KEY, creader(), CTX)) == data  # type: ignore[arg-type]


def test_empty_stream() -> None:
    parts = _seal(b"")
    assert len(parts) == 2 and _open(parts) == b""


def test_truncated_at_segment_boundary_fails() -> None:
    parts = _seal(os.urandom(3 * SEG + 10))
    for keep in range(1, len(parts)):
        with pytest.raises(DecryptionFailedError):
            _open(parts[:keep])


def test_truncated_inside_a_segment_fails() -> None:
    blob = b"".join(_seal(os.urandom(2 * SEG + 10)))
    for cut in (STREAM_HEADER_BYTES - 1, STREAM_HEADER_BYTES + 5, len(blob) - 1):
        with pytest.raises(DecryptionFailedError):
            _open([blob[:cut]])


def test_reordered_segments_fail() -> None:
    parts = _seal(os.urandom(3 * SEG))
    with pytest.raises(DecryptionFailedError):
        _open([parts[0], parts[2], parts[1], parts[3]])


def test_duplicated_segment_fails() -> None:
    parts = _seal(os.urandom(2 * SEG + 1))
    with pytest.raises(DecryptionFailedError):
        _open([parts[0], parts[1], parts[1], parts[2], parts[3]])


def test_appended_data_fails() -> None:
    parts = _seal(os.urandom(SEG + 1))
    with pytest.raises(DecryptionFailedError):
        _open([*parts, b"\x00" * 40])


def test_segment_from_another_stream_fails() -> None:
    data = os.urandom(2 * SEG + 5)
    a, b = _seal(data), _seal(data)
    with pytest.raises(DecryptionFailedError):
        _open([a[0], b[1], a[2], a[3]])


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    blob = bytearray(b"".join(_seal(os.urandom(2 * SEG + 7))))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailedError):
        _open([bytes(blob)])


def test_other_context_or_key_fails() -> None:
    parts = _seal(b"z" * 100)
    with pytest.raises(DecryptionFailedError):
        _open(parts, ctx=encode_context("tn_b", "ss_1", "tr_1", "data", "screenshot"))
    with pytest.raises(DecryptionFailedError):
        _open(parts, key=DataKey.generate())
    impostor = DataKey.from_material(KEY.dek_id, bytes(32))
    with pytest.raises(DecryptionFailedError):
        _open(parts, key=impostor)


def test_segment_size_bounds() -> None:
    with pytest.raises(ValueError):
        _seal(b"x", seg=16)
    raw = bytearray(_seal(b"x")[0])
    raw[50:54] = (16).to_bytes(4, "big")
    with pytest.raises(DecryptionFailedError):
        read_stream_header(bytes(raw))


def test_decryption_is_incremental() -> None:
    # The first segment's plaintext is available before the rest of the stream is read.
    data = os.urandom(4 * SEG)
    parts = _seal(data)
    consumed: list[int] = []

    def source() -> object:
        for i, p in enumerate(parts):
            consumed.append(i)
            yield p

    first = next(iter(open_stream(lambda _id: KEY, source(), CTX)))  # type: ignore[arg-type]
    assert first == data[:SEG]
    assert max(consumed) < len(parts) - 1
