"""Audit of refused API keys, bounded so a flood of bad keys cannot fill the audit log.

Each process writes at most ``per_window`` refusal entries per ``window_seconds`` (of the
service clock); refusals past that are counted, not written, and the next entry written
carries the count
(``suppressed``), so the log says how many refusals it did not itemise and nothing is lost
silently.  The bound is per process: ``W`` workers write at most ``W * per_window`` entries
per window.  Times are passed in (seconds); nothing here reads the clock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ["Admission", "RefusalLimiter"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether to write this refusal, and how many unwritten ones it must report."""

    write: bool
    suppressed: int


class RefusalLimiter:
    """A fixed-window counter: the first ``per_window`` refusals of a window are written."""

    def __init__(self, per_window: int, window_seconds: float) -> None:
        self._per_window = per_window
        self._window = window_seconds
        self._start = float("-inf")
        self._written = 0
        self._suppressed = 0
        self._lock = threading.Lock()

    def admit(self, now: float) -> Admission:
        """Account one refusal at time ``now`` (seconds)."""
        with self._lock:
            if now - self._start >= self._window:
                self._start, self._written = now, 0
            if self._written >= self._per_window:
                self._suppressed += 1
                return Admission(False, 0)
            self._written += 1
            suppressed, self._suppressed = self._suppressed, 0
            return Admission(True, suppressed)

    def give_back(self, suppressed: int) -> None:
        """A write that failed: its reported count goes back to be reported next time."""
        with self._lock:
            self._suppressed += suppressed
