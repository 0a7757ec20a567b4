"""Liveness, readiness and Prometheus metrics (no authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from sandboxsec import __version__
from sandboxsec.api.deps import ServicesDep
from sandboxsec.errors import SandboxSecError

router = APIRouter()
page_router = APIRouter()


@page_router.get("/healthz", tags=["health"])
def healthz(services: ServicesDep) -> JSONResponse:
    """200 while the process serves, its database answers and its root key is usable;
    503 (with which dependency failed) otherwise."""
    db_ok = services.db.ping()
    try:
        # A fresh service has no root key until the first tenant key is made: that is ready.
        # Once keys depend on it, a missing root key is an outage (checked inside).
        services.key_hierarchy.check_key_provider()
        keys_ok = True
    except SandboxSecError:
        keys_ok = False
    ok = db_ok and keys_ok
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "database": "ok" if db_ok else "unavailable",
         "key_provider": "ok" if keys_ok else "unavailable", "version": __version__},
        status_code=200 if ok else 503,
    )


@page_router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    """Prometheus text exposition of this worker's counters."""
    data = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(data, media_type="text/plain; version=0.0.4")
