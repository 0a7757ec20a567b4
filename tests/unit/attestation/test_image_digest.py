"""Streaming image digests: equal to hashlib, bounded memory on multi-gigabyte files."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.digest import format_digest, parse_digest, sha256_file, sha256_stream
from sandboxsec.errors import SandboxSecError


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 700))
def test_stream_equals_hashlib_for_any_chunking(data: bytes, chunk: int) -> None:
    assert (
        sha256_stream(io.BytesIO(data), chunk_size=chunk)
        == "sha256:" + hashlib.sha256(data).hexdigest()
    )


@pytest.mark.parametrize(
    "size", [0, 1, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 1024 * 1024, 3 * 1024 * 1024 + 7]
)
def test_file_digest_across_chunk_boundaries(tmp_path: Path, size: int) -> None:
    data = (bytes(range(256)) * (size // 256 + 1))[:size]
    path = tmp_path / "img"
    path.write_bytes(data)
    assert sha256_file(path) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path), chunk_size=4096) == sha256_file(path)


def test_multi_gigabyte_sparse_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    # A 2 GiB sparse file costs no disk, and reading holes is memory-speed, so this stays a
    # couple of seconds while proving the digest never holds the image in memory.
    size = 2 * 1024**3 + 12345
    path = tmp_path / "huge.img"
    with path.open("wb") as fh:
        fh.truncate(size)
        fh.seek(size - 5)
        fh.write(b"tail!")
    tracemalloc.start()
    try:
        digest = sha256_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes: the image is not being streamed"
    # SHA-256 of (2 GiB + 12340) zero bytes then b"tail!", computed once with hashlib.
    assert digest == "sha256:58cb1b8c2613ab25e1f933bb66c07022773247b552c358bf1b48cc7c5f33bc22"


def test_unreadable_paths(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(SandboxSecError) as info:
            sha256_file(path)
        assert info.value.reason == "image_unreadable"
        assert info.value.status == 400


def test_digest_notation() -> None:
    raw = hashlib.sha256(b"x").digest()
    assert parse_digest(format_digest(raw)) == raw
    for bad in (
        "sha256:" + "AB" * 32,
        "sha512:" + "ab" * 32,
        "ab" * 32,
        "sha256:" + "ab" * 31,
        "sha256: " + "ab" * 32,
    ):
        with pytest.raises(SandboxSecError):
            parse_digest(bad)
    with pytest.raises(ValueError):
        format_digest(b"short")
