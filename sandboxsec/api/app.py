"""The FastAPI application: thin routes over :class:`~sandboxsec.services.Services`."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sandboxsec import __version__
from sandboxsec.api.errors import ERROR_RESPONSES, install_error_handlers
from sandboxsec.api.gate import PERSON_COOKIE, KeyGate, PersonGate, RateLimiter
from sandboxsec.api.middleware import Metrics, RequestGuard
from sandboxsec.api.openapi import install_openapi, operation_id
from sandboxsec.services import Services

__all__ = ["HOT_ROUTE_MODULES", "ROUTE_MODULES", "create_app"]

#: Route modules under ``sandboxsec.api.routes``: ``router`` is mounted at ``/v1``,
#: ``page_router`` (if any) at the root.
ROUTE_MODULES = (
    "health", "tenants", "attestation", "sessions", "actions", "approvals", "grants",
    "policy", "trajectory", "keys", "audit", "people", "webhooks",
)
#: Mounted before the others: routes are tried in mount order, and trying the routes of four
#: routers before reaching ``POST /v1/actions`` cost about as much as checking its proof.  No
#: path of these overlaps another module's; the OpenAPI document keeps ROUTE_MODULES' order.
HOT_ROUTE_MODULES = ("actions",)


def create_app(services: Services | None = None, *, own_services: bool | None = None) -> FastAPI:
    """Build the app around ``services`` (a default :class:`Services` when omitted).

    When the app builds its own services it also closes them at shutdown.
    """
    svc = services or Services()
    close_at_end = own_services if own_services is not None else services is None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Each serving process delivers the tenants' webhook outbox (claims are one-winner).
        svc.webhooks.start()
        try:
            yield
        finally:
            svc.webhooks.close()
            if close_at_end:
                svc.close()

    app = FastAPI(
        title="sandboxsec",
        version=__version__,
        description="Attested sandboxes, human approval for sensitive agent actions, "
        "encrypted trajectories and a verifiable audit log.",
        lifespan=lifespan,
        # /docs is served from local files by install_openapi (no CDN).
        docs_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.services = svc
    app.state.metrics = Metrics()
    install_error_handlers(app)
    install_openapi(app, ROUTE_MODULES)
    for name in (*HOT_ROUTE_MODULES, *(m for m in ROUTE_MODULES if m not in HOT_ROUTE_MODULES)):
        module = importlib.import_module(f"sandboxsec.api.routes.{name}")
        router = getattr(module, "router", None)
        if router is not None:
            app.include_router(router, prefix="/v1", responses=ERROR_RESPONSES)
        page = getattr(module, "page_router", None)
        if page is not None:
            app.include_router(page)
    app.add_middleware(
        RequestGuard,
        max_body=svc.settings.max_body_bytes,
        max_depth=svc.settings.max_json_depth,
        metrics=app.state.metrics,
        record_body=svc.settings.max_record_bytes * 4 // 3 + (1 << 20),
        body_timeout=svc.settings.request_timeout_seconds,
        gate=KeyGate(svc.tenants.authenticate,
                     RateLimiter(svc.settings.rate_limit_per_second,
                                 svc.settings.rate_limit_burst)),
        person_gate=PersonGate(
            svc.settings.webauthn_origins(),
            RateLimiter(svc.settings.passkey_rate_limit_per_second,
                        svc.settings.passkey_rate_limit_burst),
            signed_in=svc.people.authenticate, enrolment=svc.people.check_enrolment,
            max_body=svc.settings.passkey_max_body_bytes),
        person_cookie=PERSON_COOKIE,
    )
    return app
