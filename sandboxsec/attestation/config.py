"""The attestation service's settings, as a small frozen value built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["AttestationConfig"]


@dataclass(frozen=True, slots=True)
class AttestationConfig:
    """Where keys and trust live, how long nonces and tokens last, the largest event log."""

    home: Path
    trust_dir: Path
    nonce_ttl_seconds: int
    token_ttl_seconds: int
    max_event_log_bytes: int
