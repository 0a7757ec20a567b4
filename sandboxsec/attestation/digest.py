"""Streaming SHA-256 of image files, and the ``sha256:<hex>`` digest notation.

Images are many gigabytes, so they are never read whole: the file is read with ``readinto``
into one reused buffer and fed to ``hashlib`` (which releases the GIL while hashing large
chunks).  Memory stays at one buffer whatever the image size, and throughput stays within a few
percent of hashing bytes already in memory (see ``bench/image_digest.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Final, Protocol

from sandboxsec.attestation.image_errors import ImageUnreadableError
from sandboxsec.errors import InputError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ReadInto",
    "format_digest",
    "parse_digest",
    "sha256_file",
    "sha256_stream",
]

#: 256 KiB (the standard library's choice too): per-call overhead is already negligible, and
#: the buffer stays inside a core's L2 cache between the kernel's copy and the hash reading it.
DEFAULT_CHUNK_SIZE: Final = 256 * 1024

_DIGEST: Final = re.compile(r"sha256:([0-9a-f]{64})")


class ReadInto(Protocol):
    """Anything with ``readinto``: raw and buffered binary files, sockets' makefile, BytesIO."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


def format_digest(raw: bytes) -> str:
    """``sha256:<lowercase hex>`` for a 32-byte SHA-256 value."""
    if len(raw) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes")
    return "sha256:" + raw.hex()


def parse_digest(text: str) -> bytes:
    """The 32 raw bytes of a ``sha256:<64 lowercase hex>`` string; anything else is refused.

    Only one spelling is accepted so that two strings naming the same digest cannot be told
    apart by a revocation list or cache key.
    """
    match = _DIGEST.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InputError("digest must be 'sha256:' followed by 64 lowercase hex digits")
    return bytes.fromhex(match.group(1))


def sha256_stream(stream: ReadInto, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """Digest everything left in ``stream`` with one reused buffer of ``chunk_size`` bytes."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    h = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    readinto = stream.readinto
    update = h.update
    while True:
        n = readinto(view)
        if not n:
            break
        # Slicing a memoryview copies nothing.
        update(view[:n])
    return "sha256:" + h.hexdigest()


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> str:
    """``sha256:<hex>`` of the file at ``path``, streamed.

    Raises :class:`ImageUnreadableError` when the file cannot be opened or read.
    """
    p = Path(path)
    try:
        # Unbuffered: readinto goes straight from the kernel into our buffer.
        with p.open("rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                try:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                except OSError:
                    pass  # only a hint; some filesystems refuse it
            return sha256_stream(fh, chunk_size=chunk_size)
    except IsADirectoryError as exc:
        raise ImageUnreadableError(f"{p}: is a directory, not an image file") from exc
    except OSError as exc:
        raise ImageUnreadableError(f"{p}: cannot read ({exc.strerror or exc})") from exc
