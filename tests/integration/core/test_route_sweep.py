"""Every route, with every role and with garbage: a 4xx with a reason code, never a 500."""

from __future__ import annotations

import itertools
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import TenantKeys

GARBAGE: list[Any] = [
    None,
    [],
    "x",
    12,
    {"": None},
    {"nonce": "!!!not base64!!!", "quote": "@@", "signature": 7, "ak_public": None},
    {"session_id": ["x"], "action": {"a": 1}, "params": "str", "resource": 5},
    {"kind": 1, "data": "%%%", "meta": []},
    {"grant": 1, "action": None, "params": []},
    {"params_hash": {"x": 1}},
    {"attestation_token": "A" * 70000},
]


def _paths(client: TestClient) -> list[tuple[str, str]]:
    spec = client.get("/openapi.json").json()
    out = []
    for path, ops in spec["paths"].items():
        for method in ops:
            if method in ("get", "post", "put", "delete", "patch"):
                out.append((method.upper(), path))
    return out


def _fill(path: str) -> str:
    # Ids that do not exist (and are of odd shapes) for every path parameter.
    out = path
    while "{" in out:
        start = out.index("{")
        end = out.index("}", start)
        out = out[:start] + "nope-%2e%2e-" + "9" * 30 + out[end + 1 :]
    return out


def _check(resp: Any, what: str) -> None:
    assert resp.status_code < 500 or resp.status_code == 503, (
        f"{what}: {resp.status_code} {resp.text[:300]}"
    )
    if resp.status_code >= 400:
        body = resp.json()
        assert set(body) == {"error"}, f"{what}: {body}"
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]


def test_no_route_answers_500_to_anyone(client: TestClient, tenant: TenantKeys) -> None:
    paths = _paths(client)
    assert len(paths) >= 5
    auths: list[dict[str, str]] = [{}, {"Authorization": "Bearer garbage"}]
    auths += [tenant.headers(r) for r in ("admin", "agent", "approver", "auditor")]
    for (method, path), headers in itertools.product(paths, auths):
        url = _fill(path)
        if path.endswith("/wait"):
            url += "?timeout=0"
        if method in ("GET", "DELETE"):
            _check(client.request(method, url, headers=headers), f"{method} {path}")
            continue
        for body in GARBAGE:
            r = client.request(method, url, json=body, headers=headers)
            _check(r, f"{method} {path} {body!r:.60}")
        r = client.request(
            method,
            url,
            content=b"\xff\xfe{",
            headers={**headers, "content-type": "application/json"},
        )
        _check(r, f"{method} {path} non-utf8")
