"""No 500 from text, anywhere: non-ASCII digits and lone surrogates through every route and
every text parser (checkpoint notes, audit exports and proofs, the command line).

``str.isdigit()`` is true for superscript two and circled one, which ``int()`` then
refuses; ``int()`` itself takes Arabic-Indic and fullwidth digits; JSON's ``"\\ud800"``
decodes to a ``str`` no UTF-8 encoder accepts.
Each must be a 4xx with a reason code (or, for parsers, a typed error), never a crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.audit.checkpoint import parse_signed_checkpoint, verify_signed_checkpoint
from sandboxsec.audit.verify import verify_entry_proof, verify_export
from sandboxsec.cli import main
from sandboxsec.errors import SandboxSecError
from tests.conftest import TenantKeys

# Digits of other scripts, superscripts, circled, fullwidth, mathematical; then surrogates.
DIGITS = ["\u00b2", "\u2460", "\u0661\u0662", "\uff11\uff12", "\U0001d7d7", "\u0969"]
SURROGATES = ["\ud800", "\udfff", "a\udc00b", "\ud83d"]
HOSTILE = DIGITS + SURROGATES + ["1_2", " 12", "+1", "-0", "0x10", "1e3"]

_text = st.lists(
    st.one_of(st.sampled_from(HOSTILE), st.integers(0xD800, 0xDFFF).map(chr),
              st.characters(categories=["Nd", "No", "Nl"]), st.text(max_size=3)),
    min_size=1, max_size=4,
).map("".join)


def _json_bytes(value: Any) -> bytes:
    # ensure_ascii writes lone surrogates as \\udXXX escapes: exactly what a client can send.
    return json.dumps(value, ensure_ascii=True).encode("ascii")


def _routes(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    spec = client.get("/openapi.json").json()
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            schema = (op.get("requestBody", {}).get("content", {})
                      .get("application/json", {}).get("schema", {}))
            out.append((method.upper(), path, _resolve(spec, schema)))
    return out


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return dict(spec["components"]["schemas"][name])
    return schema


def _body(schema: dict[str, Any], text: str) -> dict[str, Any]:
    """Every declared field set to ``text`` (objects get it as a key and a value)."""
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        kinds = {prop.get("type")} | {p.get("type") for p in prop.get("anyOf", [])}
        if "object" in kinds:
            out[name] = {text: text, "sha256": {text: text}}
        elif "array" in kinds:
            out[name] = [text]
        else:
            out[name] = text
    return out


def _quoted(text: str) -> str:
    from urllib.parse import quote

    # Surrogates travel as their (invalid) UTF-8 bytes, percent-encoded.
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def _path(path: str, text: str) -> str:
    piece = _quoted(text)
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        path = path[:start] + piece + path[end + 1 :]
    return path


def _check(resp: Any, what: str) -> None:
    assert resp.status_code < 500 or resp.status_code == 503, (
        f"{what}: {resp.status_code} {resp.text[:300]}"
    )
    if resp.status_code >= 400:
        assert isinstance(resp.json()["error"]["code"], str), what


@pytest.mark.parametrize("text", HOSTILE)
def test_every_route_with_hostile_text(client: TestClient, tenant: TenantKeys,
                                       text: str) -> None:
    roles = [tenant.headers(r) for r in ("admin", "agent", "approver", "auditor")]
    for method, path, schema in _routes(client):
        url = _path(path, text)
        query = "&".join(f"{k}={_quoted(text)}" for k in
                         ("limit", "cursor", "timeout", "since", "at", "start", "end"))
        for headers in roles:
            if method in ("GET", "DELETE"):
                r = client.request(method, f"{url}?{query}", headers=headers)
                _check(r, f"{method} {path} {text!r}")
                continue
            r = client.request(method, url, content=_json_bytes(_body(schema, text)),
                               headers={**headers, "content-type": "application/json"})
            _check(r, f"{method} {path} {text!r}")


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=_text)
def test_attestation_and_grant_bodies_with_random_text(client: TestClient, tenant: TenantKeys,
                                                       text: str) -> None:
    """The routes that parse integers and encodings from strings, with generated text."""
    agent = {**tenant.headers("agent"), "content-type": "application/json"}
    bodies = [
        ("/v1/attestation/verify", {"nonce": "AAAA", "quote": text, "signature": text,
                                    "ak_public": text, "pcrs": {"sha256": {text: text}},
                                    "event_log": text, "image_manifest": text}),
        ("/v1/attestation/ak/challenge", {"ak_public": text, "ek_certificate": text,
                                          "ek_intermediates": [text]}),
        ("/v1/grants/verify", {"grant": text, "action": text, "params": {text: text}}),
        ("/v1/sessions", {"attestation_token": text}),
    ]
    for url, body in bodies:
        _check(client.post(url, content=_json_bytes(body), headers=agent), f"{url} {text!r}")


def test_lone_surrogate_is_invalid_input(client: TestClient, tenant: TenantKeys) -> None:
    for raw in (b'{"name": "\\ud800"}', b'{"name": "\xed\xa0\x80"}', b'{"name": "a\\udc00"}'):
        r = client.post("/v1/tenants", content=raw, headers={
            **tenant.headers("admin"), "content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_input"
    # A surrogate pair is a character, not an error.
    r = client.post("/v1/attestation/challenge", content=b'{"x": "\\ud83d\\ude00"}',
                    headers={**tenant.headers("agent"), "content-type": "application/json"})
    assert r.status_code < 500


# -- parsers --------------------------------------------------------------------------------------

_KEY = Ed25519PrivateKey.generate()


@settings(max_examples=200, deadline=None)
@given(size=_text, root=_text)
def test_checkpoint_parser_never_crashes(size: str, root: str) -> None:
    note = f"sandboxsec.local/audit\n{size}\n{root}\n\n\u2014 sandboxsec.local/audit AAAAAAA=\n"
    with pytest.raises(SandboxSecError):
        parse_signed_checkpoint(note)
    with pytest.raises(SandboxSecError):
        verify_signed_checkpoint(note, _KEY.public_key())


@pytest.mark.parametrize("size", DIGITS)
def test_checkpoint_size_in_other_digits(size: str) -> None:
    note = ("sandboxsec.local/audit\n" + size + "\n" + "A" * 43 + "=\n\n"
            "\u2014 sandboxsec.local/audit AAAAAAA=\n")
    with pytest.raises(SandboxSecError, match="canonical decimal"):
        parse_signed_checkpoint(note)


@settings(max_examples=100, deadline=None)
@given(text=_text)
def test_export_and_proof_parsers_never_crash(text: str) -> None:
    header = {"format": text, "log_id": text, "tree_size": text, "checkpoint": text}
    data = (json.dumps(header, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"
            + text.encode("utf-8", "surrogatepass") + b"\n")
    with pytest.raises(SandboxSecError):
        verify_export(data, _KEY.public_key())
    bundle = {"entry": text, "seq": text, "checkpoint": text, "proof": [text], "log_id": text}
    with pytest.raises(SandboxSecError):
        verify_entry_proof(bundle, _KEY.public_key())


def _exit_code(argv: list[str]) -> int | str | None:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("digits", DIGITS)
def test_cli_refuses_non_ascii_digits(digits: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.attestation.test_image_cli import _files

    f = _files(tmp_path)
    base = ["image", "sign", str(f.image), "--key", str(f.key), "--cert", str(f.cert),
            "--chain", str(f.chain), "-o", str(tmp_path / "out.json")]
    # The same command with ASCII digits signs: only the digits make the difference.
    assert _exit_code([*base, "--pcr", "9=" + "00" * 32, "--valid-days", "9"]) == 0
    for extra in (["--pcr", f"{digits}=" + "00" * 32],
                  ["--pcr", "0=" + "00" * 32, "--event-digest", f"{digits}=" + "00" * 32],
                  ["--pcr", "0=" + "00" * 32, "--valid-days", digits]):
        assert _exit_code([*base, *extra]) == 2, extra
    assert _exit_code(["audit", "export", "--from", digits]) == 2
    capsys.readouterr()
