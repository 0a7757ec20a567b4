"""Hostile cases on both databases: TPM counters past 2^31, non-canonical encodings, text.

(The classes that need a real TPM are in ``test_hardening_swtpm.py``.)
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from fastapi.testclient import TestClient

from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.attestation.conftest import SoftMachine, Submit, bind, nonce_for

pytestmark = pytest.mark.usefixtures("machine")


def codes(verdict: dict[str, Any]) -> list[str]:
    return [f["code"] for f in verdict["failures"]]


# -- 6. reset and restart counters are UINT32 on both databases ---------------------------------


@pytest.mark.parametrize("high", [2**31, 2**32 - 1])
def test_counters_above_2_31_are_stored_and_compared(
    high: int, client: TestClient, tenant: TenantKeys, machine: SoftMachine, submit: Submit,
    services: Services,
) -> None:
    bind(client, tenant, machine)
    first = submit(reset=high - 1, restart=high)
    assert first["status"] == "affirming", first
    second = submit(reset=high, restart=high)
    assert second["status"] == "affirming", second
    # Compared as unsigned values: one below the stored reset count is a rollback.
    stale = submit(reset=high - 1, restart=high)
    assert codes(stale) == ["quote_clock_rollback"]


# -- 5. strict encodings -----------------------------------------------------------------------


def _noncanonical(b64text: str) -> str:
    """The same bytes with non-zero unused bits in the last character (decodes the same)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = b64text.rstrip("=")
    pad = len(b64text) - len(body)
    assert pad, "needs a length with unused bits"
    last = alphabet.index(body[-1])
    return body[:-1] + alphabet[last | 1] + "=" * pad  # canonical text has that bit zero


@pytest.mark.parametrize("field", ["ak_public", "nonce"])  # lengths with unused bits
def test_evidence_base64_must_be_canonical(
    field: str, client: TestClient, tenant: TenantKeys, machine: SoftMachine,
) -> None:
    bind(client, tenant, machine)
    body = machine.evidence(nonce_for(client, tenant))
    value = body[field]
    alt = _noncanonical(value)
    assert alt != value and base64.b64decode(alt) == base64.b64decode(value)
    body[field] = alt
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "attestation_evidence_malformed"


def test_token_with_junk_inside_the_signature_is_refused(
    client: TestClient, tenant: TenantKeys, machine: SoftMachine, submit: Submit,
) -> None:
    bind(client, tenant, machine)
    token = submit()["token"]
    head, body, sig = token.split(".")
    for bad in (f"{head}.{body}.{sig[:10]}!{sig[10:]}", f"{head}.{body}.{sig[:10]}*{sig[10:]}",
                f"{head}.{body}.{sig}=", f"{head}.{body}.{sig[:-1]}{chr(ord(sig[-1]) + 1)}"):
        r = client.post("/v1/sessions", headers=tenant.headers("agent"),
                        json={"attestation_token": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "attestation_token_invalid"
    assert client.post("/v1/sessions", headers=tenant.headers("agent"),
                       json={"attestation_token": token}).status_code == 201


# -- 4. no 500 from text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "index", ["\u00b2", "\u2460", "\u0661", "\uff19", "\U0001d7d7", "09", "+9", " 9", "9_"]
)
def test_pcr_index_of_non_ascii_or_non_canonical_digits(
    index: str, client: TestClient, tenant: TenantKeys, machine: SoftMachine,
) -> None:
    body = machine.evidence(nonce_for(client, tenant))
    body["pcrs"]["sha256"][index] = "00" * 32
    r = client.post("/v1/attestation/verify", headers=tenant.headers("agent"), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "attestation_evidence_malformed"
