"""The request side of session proofs: what a route needs to call ``SessionBinding.require``.

:func:`request_proof` collects the ``DPoP`` header values (all of them: two are refused, not
chosen between), the method, the path and the exact body bytes, and the API key, into a
:class:`~sandboxsec.sessions.binding.RequestProof`.  The route then calls
``services.session_binding.require(who, proof, session_id)`` with the session it acts in,
before it acts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response

from sandboxsec.sessions.binding import RequestProof

__all__ = ["ProofDep", "request_proof"]

_DPOP = b"dpop"


async def request_proof(request: Request, response: Response) -> RequestProof:
    """The request as a session proof must bind it (body read once; FastAPI caches it).

    Where the deployment requires server nonces, the answer carries the next one in
    ``DPoP-Nonce`` (a refusal carries it too: :mod:`sandboxsec.api.errors`)."""
    nonce = request.app.state.services.session_binding.fresh_nonce()
    if nonce is not None:
        response.headers["DPoP-Nonce"] = nonce
    body = await request.body()
    proofs = tuple(v.decode("latin-1") for k, v in request.headers.raw if k.lower() == _DPOP)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    api_key = key.strip() if scheme.lower() == "bearer" else ""
    return RequestProof(proofs=proofs, method=request.method, path=request.url.path,
                        body=body, api_key=api_key)


ProofDep = Annotated[RequestProof, Depends(request_proof)]
