"""FastAPI dependencies: the services, and the authenticated, authorized principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import structlog
from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from sandboxsec.api.authz import authorize
from sandboxsec.api.gate import bearer_token
from sandboxsec.principal import Principal
from sandboxsec.services import Services

__all__ = ["ServicesDep", "get_services", "require"]


async def get_services(request: Request) -> Services:
    """The :class:`Services` of the running app.

    Async (as is :func:`require`'s dependency): FastAPI runs a plain ``def`` dependency in
    the thread pool, and a hop there and back per dependency costs more than the work.
    """
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def _principal(request: Request, services: Services) -> Principal:
    token = bearer_token(request.headers.get("authorization", ""))
    # The key gate (api/gate.py) authenticated this very key before the body was read.
    admitted = request.scope.get("state", {}).get("principal")
    if admitted is not None and admitted[0] == token:
        principal: Principal = admitted[1]
        return principal
    remote = request.client.host if request.client is not None else None
    # A database read: in the thread pool, never on the event loop.
    return await run_in_threadpool(services.tenants.authenticate, token, remote=remote)


def require(permission: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates the caller and checks ``permission`` for its role.

    Authentication failures are 401 ``api_key_invalid``; a valid key whose role lacks the
    permission is 403 ``forbidden``.  Objects of other tenants are filtered in the repository
    layer (404), not here.
    """

    async def dependency(request: Request, services: ServicesDep) -> Principal:
        principal = await _principal(request, services)
        structlog.contextvars.bind_contextvars(
            tenant_id=principal.tenant_id, key_id=principal.key_id, role=str(principal.role)
        )
        authorize(principal, permission)
        request.state.principal = principal
        return principal

    dependency.__name__ = f"require_{permission.replace(':', '_')}"
    return dependency
