"""The metrics directory of ``serve``'s workers, prepared before anything imports
prometheus_client (which reads ``PROMETHEUS_MULTIPROC_DIR`` at import and opens its files
there on first use, failing if the directory does not exist)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = [
    "MULTIPROC_ENV",
    "leave_multiprocess_mode",
    "multiprocess_dir",
    "prepare_multiprocess_dir",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The shared metrics directory when the server runs several workers, else None."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def prepare_multiprocess_dir(path: Path) -> Path:
    """Create ``path`` empty (0700) and point :data:`MULTIPROC_ENV` at it, for the workers
    about to be started (they inherit the environment and read it when they import
    prometheus_client)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def leave_multiprocess_mode() -> None:
    """For a command that serves no metrics: keep its counters in memory rather than add
    files to (or fail on) the server's directory."""
    os.environ.pop(MULTIPROC_ENV, None)
