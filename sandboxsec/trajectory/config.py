"""The trajectory service's settings, as a small frozen value built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrajectoryConfig"]


@dataclass(frozen=True, slots=True)
class TrajectoryConfig:
    """Largest record, and from which size and in which segments records are streamed."""

    max_record_bytes: int
    stream_threshold_bytes: int
    stream_segment_bytes: int
