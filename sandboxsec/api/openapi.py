"""The OpenAPI document as generated clients need it, and ``/docs`` without a CDN.

Only metadata changes here, never a path, field or status the API answers with:

* a ``bearer`` security scheme, required by every operation that authenticates (found from
  the route's ``require(...)`` dependency) and explicitly absent from public ones;
* readable, unique operation ids (``request_action``, ``approve_request``...), so generated
  clients get method names people can read;
* per-route error statuses: 401/403/429 only where a key is checked, 404 only where an object is
  looked up, 409 and 422 only where a state or a verification can refuse;
* descriptions in plain text (reStructuredText literals become Markdown code spans);
* ``/docs``: Swagger UI from the files of the ``swagger-ui-bundle`` package, so the page works
  on a machine with no route to the internet.
"""

from __future__ import annotations

import importlib
import mimetypes
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from sandboxsec.errors import NotFoundError

__all__ = ["DOCS_ASSETS", "install_openapi", "operation_id"]

#: Names that would be ambiguous or unreadable on their own, by (method, path).
_OPERATION_IDS = {
    ("POST", "/v1/attestation/challenge"): "attestation_challenge",
    ("POST", "/v1/attestation/verify"): "attestation_verify",
    ("POST", "/v1/attestation/ak/challenge"): "ak_challenge",
    ("POST", "/v1/attestation/ak/activate"): "ak_activate",
    ("GET", "/v1/attestation/keys"): "attestation_keys",
    ("GET", "/v1/audit/checkpoint"): "audit_checkpoint",
    ("GET", "/v1/audit/export"): "audit_export",
    ("GET", "/v1/audit/keys"): "audit_keys",
    ("GET", "/v1/audit/proof"): "audit_inclusion_proof",
    ("GET", "/v1/audit/consistency"): "audit_consistency_proof",
    ("POST", "/v1/audit/hash"): "audit_hash",
    ("POST", "/v1/keys/rotate"): "rotate_tenant_key",
    ("POST", "/v1/keys/rewrap"): "rewrap_data_keys",
    ("POST", "/v1/keys/retire"): "retire_key_versions",
    ("GET", "/v1/keys"): "tenant_key_status",
    ("POST", "/v1/approvals/{approval_id}/approve"): "approve_request",
    ("POST", "/v1/approvals/{approval_id}/deny"): "deny_request",
    ("POST", "/v1/api-keys"): "create_api_key",
    ("GET", "/v1/api-keys"): "list_api_keys",
    ("DELETE", "/v1/api-keys/{key_id}"): "revoke_api_key",
}

#: Statuses a route can refuse with beyond the common ones, by (method, path).
_EXTRA_STATUSES: dict[tuple[str, str], set[int]] = {
    ("POST", "/v1/attestation/verify"): {409, 422},
    ("POST", "/v1/attestation/ak/activate"): {409, 422},
    ("POST", "/v1/attestation/ak/challenge"): {422},
    ("POST", "/v1/sessions"): {409, 422},
    ("POST", "/v1/actions"): {404, 409},  # the session named in the body
    ("GET", "/v1/approvals"): {404},  # the session named in the query
    ("POST", "/v1/approvals/{approval_id}/approve"): {409},
    ("POST", "/v1/approvals/{approval_id}/deny"): {409},
    ("PUT", "/v1/policy"): {409},
    ("POST", "/v1/sessions/{session_id}/trajectory"): {409},
    ("POST", "/v1/grants/verify"): {404, 409, 422},
    ("POST", "/v1/keys/rotate"): {409},
    ("POST", "/v1/keys/rewrap"): {409},
    ("POST", "/v1/keys/retire"): {409},
    ("DELETE", "/v1/tenant"): {409},
    ("GET", "/v1/audit/proof"): {409},
    ("GET", "/v1/audit/consistency"): {409},
    # People and their passkeys: the page's routes pass a gate of their own (origin 403,
    # address rate 429, live link or challenge 404, sign-in cookie 401) before their bodies.
    ("POST", "/v1/people"): {409},
    ("PUT", "/v1/sessions/{session_id}/owner"): {409},
    ("POST", "/v1/enroll/{token}/options"): {403, 404, 429},
    ("POST", "/v1/enroll/{token}/register"): {403, 404, 409, 422, 429},
    ("POST", "/v1/signin/options"): {403, 429},
    ("POST", "/v1/signin"): {401, 403, 404, 409, 422, 429},
    ("POST", "/v1/signout"): {403, 429},
    ("GET", "/v1/me"): {401, 403, 429},
    ("GET", "/v1/me/approvals"): {401, 403, 429},
    ("GET", "/v1/me/approvals/{approval_id}"): {401, 403, 404, 429},
    ("POST", "/v1/me/approvals/{approval_id}/challenge"): {401, 403, 404, 409, 429},
    ("POST", "/v1/me/approvals/{approval_id}/approve"): {401, 403, 404, 409, 422, 429},
    ("POST", "/v1/me/approvals/{approval_id}/deny"): {401, 403, 404, 409, 422, 429},
}

#: Writes that name no stored object, so never answer 404.
_NO_LOOKUP = {
    ("POST", "/v1/attestation/challenge"), ("POST", "/v1/api-keys"),
    ("POST", "/v1/policy/validate"), ("POST", "/v1/audit/hash"), ("PUT", "/v1/policy"),
}

#: Swagger UI files served under ``/docs/assets/`` (a fixed list, nothing else).
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
_BEARER = "bearerAuth"
_LOOKUP_PATHS = re.compile(r"\{[a-z_]+\}")


def operation_id(route: APIRoute) -> str:
    """A readable, stable operation id for ``route``."""
    method = sorted(route.methods or {"GET"})[0]
    return _OPERATION_IDS.get((method, route.path_format), route.name)


def _calls(dependant: Dependant) -> Iterable[str]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield getattr(dep.call, "__name__", "")
        yield from _calls(dep)


def _authenticated(route: APIRoute) -> bool:
    return any(name.startswith("require_") for name in _calls(route.dependant))


def _api_routes(route_modules: Iterable[str]) -> Iterable[tuple[str, APIRoute]]:
    # From the route modules themselves (mounted at /v1 by create_app): the app's own route
    # list nests included routers in a framework-private shape.
    for name in route_modules:
        module = importlib.import_module(f"sandboxsec.api.routes.{name}")
        for attr, prefix in (("router", "/v1"), ("page_router", "")):
            router = getattr(module, attr, None)
            if router is not None:
                yield from ((prefix, r) for r in router.routes if isinstance(r, APIRoute))


def _plain(text: str) -> str:
    # ``literal`` (reStructuredText) reads as noise in generated clients; `literal` does not.
    return text.replace("``", "`").replace(":class:", "").replace(":meth:", "")


def _statuses(method: str, path: str, authenticated: bool) -> set[int]:
    out = {400, 413, 503}
    if authenticated:
        # the key gate answers 401 and, over a key's rate, 429 before the route runs
        out |= {401, 403, 429}
    if _LOOKUP_PATHS.search(path) or (method != "GET" and (method, path) not in _NO_LOOKUP):
        # writes name objects in their bodies (a session, a credential, a grant...)
        out.add(404)
    return out | _EXTRA_STATUSES.get((method, path), set())


def _in_module_order(routes: Sequence[BaseRoute], route_modules: Iterable[str]
                     ) -> list[BaseRoute]:
    """``routes`` in the order of ``route_modules`` (the app mounts its hottest first, for
    matching speed; the document lists them as the modules are listed)."""
    rank: dict[int, int] = {}
    for i, name in enumerate(route_modules):
        module = importlib.import_module(f"sandboxsec.api.routes.{name}")
        for attr in ("router", "page_router"):
            router = getattr(module, attr, None)
            if router is not None:
                rank[id(router)] = i
    # An included router names the router it came from; anything else keeps its place first.
    return sorted(routes, key=lambda r: rank.get(id(getattr(r, "original_router", None)), -1))


def _document(app: FastAPI, route_modules: Iterable[str]) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=_in_module_order(app.routes, route_modules))
    doc.setdefault("components", {}).setdefault("securitySchemes", {})[_BEARER] = {
        "type": "http", "scheme": "bearer",
        "description": "An API key of one tenant and one role: `Authorization: Bearer ssk_...`",
    }
    routes = {(m, prefix + r.path_format): r for prefix, r in _api_routes(route_modules)
              for m in (r.methods or ())}
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            route = routes.get((method.upper(), path))
            if route is None:
                continue
            authenticated = _authenticated(route)
            op["security"] = [{_BEARER: []}] if authenticated else []
            keep = _statuses(method.upper(), path, authenticated)
            op["responses"] = {code: r for code, r in op.get("responses", {}).items()
                               if not (code.isdigit() and int(code) >= 400
                                       and int(code) not in keep)}
            for key in ("description", "summary"):
                if isinstance(op.get(key), str):
                    op[key] = _plain(op[key])
    return doc


def install_openapi(app: FastAPI, route_modules: Iterable[str]) -> None:
    """Replace the app's OpenAPI generator and add ``/docs`` with local assets.

    ``route_modules`` are the modules under ``sandboxsec.api.routes`` the app mounts.
    """
    modules = tuple(route_modules)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document(app, modules)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI over ``/openapi.json``; every file it loads comes from this service."""
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        """One of :data:`DOCS_ASSETS` (nothing else is served from here)."""
        if name not in DOCS_ASSETS:
            raise NotFoundError("no such asset")
        from swagger_ui_bundle import swagger_ui_path  # only when the page is opened

        media = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return Response((swagger_ui_path / name).read_bytes(), media_type=media,
                        headers={"Cache-Control": "public, max-age=86400"})
