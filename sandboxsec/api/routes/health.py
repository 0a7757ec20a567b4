"""Liveness, readiness and Prometheus metrics (no authentication)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest
from sqlmodel import col, func, select

from sandboxsec import __version__
from sandboxsec.api.deps import ServicesDep
from sandboxsec.audit.models import AuditHeadRow
from sandboxsec.crypto.errors import NodeIdentityMismatchError
from sandboxsec.errors import SandboxSecError
from sandboxsec.metrics import StateCollector, scrape_registry
from sandboxsec.policy.models import ApprovalRequest
from sandboxsec.services import Services
from sandboxsec.storage.db import Database

router = APIRouter()
page_router = APIRouter()


@page_router.get("/healthz", tags=["health"])
def healthz(services: ServicesDep) -> JSONResponse:
    """200 while the process serves, its database answers, its root key is usable, its keys
    are the cluster's and no audit log is stopped by an integrity alarm; 503 (with which one
    failed) otherwise."""
    db_ok = services.db.ping()
    try:
        # A fresh service has no root key until the first tenant key is made: that is ready.
        # Once keys depend on it, a missing root key is an outage (checked inside).
        services.key_hierarchy.check_key_provider()
        keys_ok = True
    except SandboxSecError:
        keys_ok = False
    # This node's keys are the cluster's (cached after the first success; see
    # crypto/service_keys.py): a node with another identity must not look healthy.
    identity = node_identity(services)
    # Codes only: tenant ids are not for an unauthenticated caller (``audit alarm`` lists them).
    alarms = sorted({a.code for a in services.audit.guard.states.alarms()})
    ok = db_ok and keys_ok and identity == "ok" and not alarms
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "database": "ok" if db_ok else "unavailable",
         "key_provider": "ok" if keys_ok else "unavailable", "node_identity": identity,
         "audit": "alarm" if alarms else "ok", "audit_alarms": alarms,
         "version": __version__},
        status_code=200 if ok else 503,
    )


def node_identity(services: Services) -> str:
    """``ok``, ``mismatch`` (this node's keys are not the cluster's) or ``unavailable``."""
    try:
        services.service_keys.establish()
    except NodeIdentityMismatchError:
        return "mismatch"
    except SandboxSecError:
        return "unavailable"
    return "ok"


@page_router.get("/metrics", tags=["health"], response_class=PlainTextResponse)
def metrics(request: Request, services: ServicesDep) -> PlainTextResponse:
    """Prometheus text exposition: HTTP and domain counters (summed over every worker when
    the server runs several) and gauges read at scrape time (database, key provider, and the
    audit alarms, which live in files shared by every worker)."""
    state = StateCollector(lambda: _pending(services.db), lambda: _newest(services.db),
                           lambda: _keys_ok(services),
                           lambda: Counter(a.code for a in services.audit.guard.states.alarms()))
    data = generate_latest(scrape_registry(request.app.state.metrics.registry, state))
    return PlainTextResponse(data, media_type="text/plain; version=0.0.4")


def _pending(db: Database) -> int | None:
    try:
        with db.session() as s:
            return int(s.exec(select(func.count()).select_from(ApprovalRequest)
                              .where(col(ApprovalRequest.state) == "pending")).one())
    except SandboxSecError:
        return None


def _newest(db: Database) -> list[datetime] | None:
    """When each log with entries not yet covered by a checkpoint last had one (a log whose
    every entry is covered is not waiting, however old its checkpoint: quiet tenants do not
    age)."""
    try:
        with db.session() as s:
            rows = s.exec(select(AuditHeadRow.checkpoint_at)
                          .where(col(AuditHeadRow.size) > col(AuditHeadRow.checkpoint_size))).all()
    except SandboxSecError:
        return None
    return [t if t.tzinfo else t.replace(tzinfo=UTC) for t in rows if t is not None]


def _keys_ok(services: Services) -> bool:
    try:
        if services.keys.has_root_key():
            services.keys.check()
        return True
    except SandboxSecError:
        return False
