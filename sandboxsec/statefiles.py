"""Private files under ``SANDBOXSEC_HOME``: service keys and secrets, created once, mode 0600.

Several worker processes start at once and each may find a key missing.  The content is
written to a private temporary file and hard-linked into place, which is atomic and refuses to
overwrite: exactly one process's key wins, every process then reads that one, and no reader
ever sees a half-written file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["create_once", "private_dir", "replace_private"]


def private_dir(path: Path) -> None:
    """Create ``path`` and every missing parent with mode 0700 (``mkdir(parents=True,
    mode=...)`` applies the mode to the last component only; its parents get the umask's)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)


def create_once(path: Path, content: bytes) -> bytes:
    """Write ``content`` to ``path`` (mode 0600, parent 0700) unless it exists; return what is
    at ``path`` afterwards (the caller's content, or the file another process made first).

    Raises ``OSError`` when the file can neither be created nor read; callers turn that into
    their fail-closed "key unavailable" error.
    """
    if not path.exists():
        private_dir(path.parent)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won; use its file
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_bytes()


def replace_private(path: Path, content: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``content`` atomically (a private temporary file renamed over it,
    mode 0600): a reader sees the old file or the new one, never a mix.

    ``durable`` fsyncs the file and its directory before returning, so the new content
    survives a power cut; without it the rename is atomic but may be lost.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
