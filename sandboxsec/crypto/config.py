"""The key hierarchy's settings, as a small frozen value built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KeyHierarchyConfig"]


@dataclass(frozen=True, slots=True)
class KeyHierarchyConfig:
    """How long unwrapped keys stay cached, how many, and how many seals one DEK makes."""

    cache_ttl_seconds: float
    cache_max_entries: int
    dek_max_messages: int
