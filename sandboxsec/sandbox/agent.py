"""The agent runtime's client: now the ``sandboxsec-client`` distribution.

This module stays so that ``from sandboxsec.sandbox.agent import AgentClient`` keeps working;
new code imports from :mod:`sandboxsec_client` (``docs/clients.md``), which also has the
approver, downstream, auditor and admin clients and their async flavours.
"""

from __future__ import annotations

from sandboxsec_client import (
    AgentClient,
    ApiError,
    Approval,
    Attester,
    Decision,
    GrantCheck,
    SessionInfo,
    Verdict,
)

__all__ = [
    "AgentClient",
    "ApiError",
    "Approval",
    "Attester",
    "Decision",
    "GrantCheck",
    "SessionInfo",
    "Verdict",
]
