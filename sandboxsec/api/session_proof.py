"""The request side of session proofs: what a route needs to call ``SessionBinding.require``.

:func:`request_proof` collects the ``DPoP`` header values (all of them: two are refused, not
chosen between), the method, the path and the exact body bytes, and the API key, into a
:class:`~sandboxsec.sessions.binding.RequestProof`.  The route then calls
``services.session_binding.require(who, proof, session_id)`` with the session it acts in,
before it acts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from sandboxsec.sessions.binding import RequestProof

__all__ = ["ProofDep", "request_proof"]

_DPOP = b"dpop"


async def request_proof(request: Request) -> RequestProof:
    """The request as a session proof must bind it (body read once; FastAPI caches it)."""
    body = await request.body()
    proofs = tuple(v.decode("latin-1") for k, v in request.headers.raw if k.lower() == _DPOP)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    api_key = key.strip() if scheme.lower() == "bearer" else ""
    return RequestProof(proofs=proofs, method=request.method, path=request.url.path,
                        body=body, api_key=api_key)


ProofDep = Annotated[RequestProof, Depends(request_proof)]
