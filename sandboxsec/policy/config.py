"""The policy services' settings, as small frozen values built by the composition root."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ApprovalConfig", "GrantConfig", "PolicyConfig"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Decisions: how long an approval request they open stays open."""

    approval_ttl_seconds: int


@dataclass(frozen=True, slots=True)
class ApprovalConfig:
    """Waiting on approvals: the longest wait and the SQLite re-check interval."""

    wait_max_seconds: float
    recheck_seconds: float


@dataclass(frozen=True, slots=True)
class GrantConfig:
    """How long an issued grant stays usable."""

    ttl_seconds: int
