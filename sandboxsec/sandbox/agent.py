"""The reference sandbox's agent client: the ``sandboxsec-client`` agent, on the sandbox clock.

The client distribution (:mod:`sandboxsec_client`, ``docs/clients.md``) speaks the API and
signs every session call with the session key through its built-in prover
(:class:`sandboxsec_client.SessionProver`): after :meth:`AgentClient.attest` with a TPM that
holds a session key (:class:`sandboxsec.sandbox.swtpm.SwTpm`), the TPM signs each proof.
This module only puts the prover on an injectable :class:`~sandboxsec.clock.Clock`, so the
reference sandbox and its tests share the service's notion of time.
``from sandboxsec.sandbox.agent import AgentClient`` keeps working.
"""

from __future__ import annotations

import httpx
from sandboxsec_client import (
    AgentClient as _ClientAgent,
)
from sandboxsec_client import (
    ApiError,
    Approval,
    Attester,
    Decision,
    GrantCheck,
    RetryPolicy,
    SessionInfo,
    SessionKeyAttester,
    SessionKeySigner,
    SessionProver,
    Verdict,
)

from sandboxsec.clock import Clock, SystemClock

__all__ = [
    "AgentClient",
    "ApiError",
    "Approval",
    "Attester",
    "Decision",
    "GrantCheck",
    "SessionInfo",
    "SessionKeyAttester",
    "SessionKeySigner",
    "SessionProver",
    "Verdict",
]


class AgentClient(_ClientAgent):
    """The client's :class:`sandboxsec_client.AgentClient` whose proofs take their time
    from ``clock``."""

    prover: SessionProver

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, http: httpx.Client | None = None,
                 clock: Clock | None = None) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retry=retry, http=http)
        on: Clock = clock or SystemClock()
        assert self.prover is not None  # no proof= given: the built-in prover is there
        self.prover.now = lambda: on.now().timestamp()
