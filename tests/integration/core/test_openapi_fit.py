"""The OpenAPI document fits generated clients, and /docs works with no route to a CDN."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import TenantKeys

PUBLIC = {("get", "/v1/grants/keys"), ("get", "/v1/grants/jwks"), ("get", "/v1/attestation/keys"),
          ("get", "/healthz"), ("get", "/metrics")}
#: A person's routes: an enrolment link, a passkey sign-in and its cookie instead of an API key.
PERSON_PREFIXES = ("/v1/enroll/", "/v1/signin", "/v1/signout", "/v1/me")


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in spec["paths"].items() for m, op in item.items()]


def test_security_scheme_and_operation_ids(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": spec["components"][
            "securitySchemes"]["bearerAuth"]["description"]}
    ids = [op["operationId"] for _, _, op in _operations(spec)]
    assert len(ids) == len(set(ids)), "operation ids must be unique"
    for op_id in ids:
        # readable: a snake_case verb phrase, not the framework's name_path_method
        assert re.fullmatch(r"[a-z][a-z_]+", op_id) and "_v1_" not in op_id, op_id
    by_id = {op["operationId"]: (m, p) for m, p, op in _operations(spec)}
    assert by_id["request_action"] == ("post", "/v1/actions")
    assert by_id["approve_request"] == ("post", "/v1/approvals/{approval_id}/approve")
    for method, path, op in _operations(spec):
        if (method, path) in PUBLIC:
            assert op["security"] == [] and "401" not in op["responses"], path
        elif path.startswith(PERSON_PREFIXES):
            assert op["security"] == [] and "403" in op["responses"], path
        else:
            assert op["security"] == [{"bearerAuth": []}], path
            assert {"401", "403"} <= set(op["responses"]), path


def test_error_statuses_are_per_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    responses = {(m, p): set(op["responses"]) for m, p, op in _operations(spec)}
    # a state conflict only where a state can conflict; a lookup only where something is named
    assert "409" in responses[("post", "/v1/approvals/{approval_id}/approve")]
    assert "409" not in responses[("get", "/v1/approvals")]
    assert "404" not in responses[("get", "/v1/audit/checkpoint")]
    assert "404" in responses[("get", "/v1/approvals/{approval_id}")]
    assert "422" in responses[("post", "/v1/grants/verify")]
    assert "422" not in responses[("get", "/v1/policy")]
    # the key gate: a key over its rate is 429, only where a key is checked
    assert "429" in responses[("post", "/v1/actions")]
    assert "429" not in responses[("get", "/v1/grants/jwks")]
    # every documented error has the error document's schema
    for (_m, _p), codes in responses.items():
        assert all(c.isdigit() for c in codes)
    descriptions = " ".join(op.get("description", "") for _, _, op in _operations(spec))
    assert "``" not in descriptions  # plain text, not reStructuredText


def test_paths_and_statuses_of_answers_are_unchanged(client: TestClient,
                                                     tenant: TenantKeys) -> None:
    spec = client.get("/openapi.json").json()
    paths = set(spec["paths"])
    for contract_path in ("/v1/attestation/challenge", "/v1/attestation/verify", "/v1/sessions",
                          "/v1/actions", "/v1/approvals/{approval_id}",
                          "/v1/approvals/{approval_id}/wait",
                          "/v1/approvals/{approval_id}/approve",
                          "/v1/approvals/{approval_id}/deny", "/v1/grants/verify",
                          "/v1/sessions/{session_id}/trajectory", "/v1/audit/checkpoint",
                          "/v1/audit/export", "/healthz", "/metrics"):
        assert contract_path in paths
    # the security scheme is documentation: a missing key is still 401 api_key_invalid
    r = client.get("/v1/approvals")
    assert (r.status_code, r.json()["error"]["code"]) == (401, "api_key_invalid")
    assert client.get("/v1/approvals", headers=tenant.headers("approver")).status_code == 200


def test_docs_page_loads_only_local_assets(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    urls += re.findall(r"url: '([^']+)'", page.text)
    assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert client.get("/docs/assets/swagger-ui.js.map").status_code == 404
    assert client.get("/docs/assets/..%2Fpy.typed").status_code == 404
