"""Sessions bound to a TPM-held key, against real swtpm on SQLite and PostgreSQL.

Every attack of the issue is here with its reason code: a session id without a proof, a
proof by another key, a software key claiming TPM attributes, a key certified by another
TPM's AK, a certify over another nonce, replays, proofs for another URL / method / body /
session, stale proofs, another tenant's session, duplicable or restricted session keys,
malformed proofs; and the lifecycle (end, expiry) refusing actions, waits, writes and grants.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tpm2_pytss.constants import TPMA_OBJECT

from sandboxsec.clock import FixedClock
from sandboxsec.principal import Role
from sandboxsec.sandbox import swtpm as sw
from sandboxsec.services import Services
from sandboxsec.sessions import dpop
from tests.conftest import TenantKeys, make_tenant
from tests.integration.attestation.test_swtpm import bind, evidence, manifest_for, nonce
from tests.integration.policy.conftest import allow_key_approvals
from tests.support.pki import Publisher, make_publisher
from tests.support.sessionkeys import SoftSessionKey

pytestmark = [
    pytest.mark.swtpm,
    pytest.mark.skipif(not sw.available(), reason="swtpm is not installed"),
]

BASE = "http://testserver"
PAY = {"amount": "125.50", "currency": "EUR", "payee": "acme-gmbh"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    now = datetime.now(UTC)
    return make_publisher(not_before=now - timedelta(days=1), not_after=now + timedelta(days=30))


@pytest.fixture
def env(services: Services, clock: FixedClock, tpm: sw.SwTpm, publisher: Publisher,
        client: TestClient, tenant: TenantKeys) -> sw.SwTpm:
    clock.set(datetime.now(UTC))
    services.attestation.configure_trust(
        publishers=publisher.trust(), ek_roots=[tpm.ca_root], ek_intermediates=[tpm.ca_issuer])
    assert bind(client, tenant, tpm)["bound"] is True
    return tpm


class Agent:
    """The sandbox's agent as the tests drive it: its API key and its TPM-held key."""

    def __init__(self, client: TestClient, tenant: TenantKeys, tpm: sw.SwTpm,
                 clock: FixedClock) -> None:
        self.client, self.tenant, self.tpm, self.clock = client, tenant, tpm, clock
        self.key = tenant.keys["agent"]
        self.jwk: dict[str, str] = {}

    def proof(self, method: str, path: str, sid: str, body: bytes = b"", *,
              signer: dpop.Signer | None = None, jwk: dict[str, str] | None = None,
              api_key: str | None = None, url: str | None = None,
              now: datetime | None = None, jti: str | None = None) -> str:
        return dpop.create_proof(signer or self.tpm.sign_session, jwk or self.jwk,
                                 method=method, url=url or BASE + path, session_id=sid,
                                 body=body, now=now or self.clock.now(),
                                 api_key=api_key or self.key, jti=jti)

    def send(self, method: str, path: str, sid: str | None, body: Any = None, *,
             proof: str | None = None, headers: dict[str, str] | None = None,
             key: str | None = None) -> Any:
        raw = json.dumps(body).encode() if body is not None else b""
        h: dict[str, str | bytes] = {"Authorization": f"Bearer {key or self.key}",
                                     **(headers or {})}
        if body is not None:
            h["Content-Type"] = "application/json"
        if proof is not None:
            h["DPoP"] = proof.encode("utf-8")  # hostile proofs may be non-ASCII
        elif sid is not None:
            h["DPoP"] = self.proof(method, path, sid, raw)
        return self.client.request(method, path, content=raw or None, headers=h)

    def attest(self, **over: Any) -> dict[str, Any]:
        """Attest with a fresh session key certified over the nonce; ``over`` replaces
        evidence fields (to send something else than the honest key and certify)."""
        n = nonce(self.client, self.tenant)
        body = evidence(self.tpm, n, manifest_for(self.tpm, PUBLISHER[0]))
        public = self.tpm.new_session_key()
        attest, sig = self.tpm.certify_session_key(over.pop("certify_nonce", n))
        body |= {"session_key": b64(public), "session_key_certify": b64(attest),
                 "session_key_signature": b64(sig)}
        body |= over
        r = self.client.post("/v1/attestation/verify", json=body,
                             headers=self.tenant.headers("agent"))
        assert r.status_code == 200, r.text
        from sandboxsec.attestation.certify import parse_session_key

        self.jwk = parse_session_key(public).jwk
        out: dict[str, Any] = r.json()
        return out

    def start(self) -> str:
        verdict = self.attest()
        assert verdict["status"] == "affirming", verdict
        r = self.send("POST", "/v1/sessions", verdict["attestation_id"],
                      {"attestation_token": verdict["token"]})
        assert r.status_code == 201, r.text
        assert r.json()["key_thumbprint"] == verdict["session_key_jkt"]
        return str(r.json()["session_id"])


PUBLISHER: list[Publisher] = []


@pytest.fixture
def agent(env: sw.SwTpm, client: TestClient, tenant: TenantKeys, clock: FixedClock,
          publisher: Publisher) -> Agent:
    PUBLISHER[:] = [publisher]
    return Agent(client, tenant, env, clock)


def code(r: Any) -> str:
    return str(r.json()["error"]["code"])


def act(agent: Agent, sid: str, **kw: Any) -> Any:
    return agent.send("POST", "/v1/actions", sid, {"session_id": sid, "action": "payment",
                                                     "resource": "payee:acme-gmbh",
                                                     "params": PAY}, **kw)


# -- the honest flow -------------------------------------------------------------------------


def test_bound_session_flow_and_end(agent: Agent, client: TestClient,
                                    tenant: TenantKeys, services: Services) -> None:
    allow_key_approvals(services, tenant)  # this flow's approver is a machine key
    sid = agent.start()
    r = act(agent, sid)
    assert r.status_code == 200, r.text
    aid = r.json()["approval_id"]
    w = agent.send("POST", f"/v1/sessions/{sid}/trajectory", sid,
                   {"kind": "action", "data": b64(b"click"), "meta": {}})
    assert w.status_code == 201, w.text
    assert agent.send("GET", f"/v1/approvals/{aid}", sid).status_code == 200
    assert agent.send("GET", f"/v1/sessions/{sid}", sid).status_code == 200
    # An agent lists approvals of its session only, with a proof.
    assert agent.send("GET", "/v1/approvals", None).status_code == 401
    listed = agent.client.get("/v1/approvals", params={"session_id": sid}, headers={
        "Authorization": f"Bearer {agent.key}",
        "DPoP": agent.proof("GET", "/v1/approvals", sid)})
    assert listed.status_code == 200 and [a["id"] for a in listed.json()] == [aid]
    # The approver approves; the agent's grant is refused once the session is ended.
    approval = client.get(f"/v1/approvals/{aid}", headers=tenant.headers("approver")).json()
    ok = client.post(f"/v1/approvals/{aid}/approve", headers=tenant.headers("approver"),
                     json={"params_hash": approval["params_hash"]})
    assert ok.status_code == 200
    grant = agent.send("GET", f"/v1/approvals/{aid}", sid).json()["grant"]
    ended = agent.send("POST", f"/v1/sessions/{sid}/end", sid)
    assert ended.status_code == 200, ended.text
    # Everything after the end is refused, each with its code.
    assert code(act(agent, sid)) == "action_session_expired"
    assert code(agent.send("POST", f"/v1/sessions/{sid}/trajectory", sid,
                           {"kind": "action", "data": b64(b"x"), "meta": {}})) \
        == "trajectory_session_closed"
    assert code(agent.send("GET", f"/v1/approvals/{aid}/wait", sid)) == "session_ended"
    assert code(agent.send("POST", f"/v1/sessions/{sid}/end", sid)) == "session_ended"
    g = client.post("/v1/grants/verify", headers=tenant.headers("approver"),
                    json={"grant": grant, "action": "payment", "params": PAY})
    assert g.status_code == 422 and code(g) == "grant_session_ended"


def test_admin_ends_a_session_and_expiry_refuses(agent: Agent, client: TestClient,
                                                 tenant: TenantKeys, clock: FixedClock,
                                                 other_tenant: TenantKeys) -> None:
    sid = agent.start()
    # Another tenant's admin cannot end it (404, as for an id that does not exist).
    r = client.post(f"/v1/sessions/{sid}/end", headers=other_tenant.headers("admin"))
    assert r.status_code == 404
    # An agent cannot end it without its proof.
    r = client.post(f"/v1/sessions/{sid}/end", headers=tenant.headers("agent"))
    assert r.status_code == 401 and code(r) == "dpop_proof_missing"
    r = client.post(f"/v1/sessions/{sid}/end", headers=tenant.headers("admin"))
    assert r.status_code == 200, r.text
    # Ending and the refused attempt are in the tenant's audit log.
    export = client.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert export.status_code == 200
    events = [json.loads(line) for line in export.text.splitlines() if line.strip()]
    text = json.dumps(events)
    assert "session:session:end" in text and "session:proof:refuse" in text
    assert "dpop_proof_missing" in text
    assert code(agent.send("GET", f"/v1/sessions/{sid}", sid)) == "session_ended"
    sid2 = agent.start()
    clock.advance(9 * 3600)  # past session_ttl_seconds (8 h)
    assert code(agent.send("GET", f"/v1/sessions/{sid2}", sid2)) == "session_expired"
    assert code(client.post(f"/v1/sessions/{sid2}/end", headers=tenant.headers("admin"))) \
        == "session_expired"


# -- proofs ----------------------------------------------------------------------------------


def test_session_id_without_proof_or_with_a_second_key(agent: Agent, services: Services,
                                                       tenant: TenantKeys) -> None:
    sid = agent.start()
    # The report: a second agent key of the tenant, on a machine that never attested.
    key2 = services.tenants.create_key(tenant.id, Role.AGENT, actor=None).key
    r = agent.client.post("/v1/actions", headers={"Authorization": f"Bearer {key2}"},
                          json={"session_id": sid, "action": "login",
                                "resource": "domain:bank.example", "params": {}})
    assert r.status_code == 401 and code(r) == "dpop_proof_missing"
    thief = SoftSessionKey()
    body = json.dumps({"session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
                       "params": PAY}).encode()
    forged = agent.proof("POST", "/v1/actions", sid, body, signer=thief.sign, jwk=thief.jwk,
                         api_key=key2)
    r = act(agent, sid, proof=forged, key=key2)
    assert r.status_code == 401 and code(r) == "dpop_key_mismatch"
    # A header naming the session's key but signed by another key.
    spoof = agent.proof("POST", "/v1/actions", sid, body, signer=thief.sign, api_key=key2)
    assert code(act(agent, sid, proof=spoof, key=key2)) == "dpop_signature_invalid"
    # The session's own key but a proof made for another API key.
    assert code(act(agent, sid, proof=agent.proof("POST", "/v1/actions", sid, body,
                                                  api_key="ssk_other"))) == "dpop_ath_mismatch"


def test_replay_url_method_body_session_and_freshness(agent: Agent, clock: FixedClock) -> None:
    other_sid = agent.start()  # (its key is dropped when the next session's key is made)
    sid = agent.start()
    body = json.dumps({"session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
                       "params": PAY}).encode()
    good = agent.proof("POST", "/v1/actions", sid, body)
    assert act(agent, sid, proof=good).status_code == 200
    assert code(act(agent, sid, proof=good)) == "dpop_replayed"
    cases = {
        "dpop_url_mismatch": agent.proof("POST", "/v1/actions", sid, body,
                                         url="https://evil.example/v1/actions"),
        "dpop_method_mismatch": agent.proof("PUT", "/v1/actions", sid, body),
        "dpop_body_mismatch": agent.proof("POST", "/v1/actions", sid, body + b" "),
        "dpop_session_mismatch": agent.proof("POST", "/v1/actions", other_sid, body),
        "dpop_stale": agent.proof("POST", "/v1/actions", sid, body,
                                  now=clock.now() - timedelta(seconds=120)),
    }
    for expected, proof in cases.items():
        r = act(agent, sid, proof=proof)
        assert r.status_code == 401 and code(r) == expected, (expected, r.text)
    future = agent.proof("POST", "/v1/actions", sid, body, now=clock.now() + timedelta(minutes=5))
    assert code(act(agent, sid, proof=future)) == "dpop_stale"
    # A proof for the trajectory of the same session does not act on /v1/actions.
    path = f"/v1/sessions/{sid}/trajectory"
    assert code(act(agent, sid, proof=agent.proof("POST", path, sid, body))) \
        == "dpop_url_mismatch"


def test_other_tenants_session_is_not_found(agent: Agent, services: Services) -> None:
    sid = agent.start()
    other = make_tenant(services, "tenant-z")
    r = act(agent, sid, key=other.keys["agent"],
            proof=agent.proof("POST", "/v1/actions", sid, json.dumps(
                {"session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
                 "params": PAY}).encode(), api_key=other.keys["agent"]))
    assert r.status_code == 404


@pytest.mark.parametrize("proof", [
    "not-a-jws", "a.b.c", "é.é.é", "x" * 10_000, "e30.e30.AAAA",
    base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ES256"}').decode().rstrip("=") + ".e30.AA",
    base64.urlsafe_b64encode(b'{"typ":"dpop+jwt","alg":"none","jwk":{}}').decode() + ".e30.",
    base64.urlsafe_b64encode(b'[' * 5000).decode().rstrip("=") + ".e30.AA",
])
def test_malformed_proofs_are_4xx(agent: Agent, proof: str) -> None:
    sid = agent.start()
    r = act(agent, sid, proof=proof)
    assert 400 <= r.status_code < 500, r.text
    assert code(r) in ("dpop_proof_malformed", "invalid_input")


def test_two_proof_headers_are_refused(agent: Agent) -> None:
    sid = agent.start()
    body = json.dumps({"session_id": sid, "action": "payment", "resource": "payee:acme-gmbh",
                       "params": PAY}).encode()
    p1 = agent.proof("POST", "/v1/actions", sid, body)
    p2 = agent.proof("POST", "/v1/actions", sid, body)
    r = agent.client.post("/v1/actions", content=body, headers=[
        ("Authorization", f"Bearer {agent.key}"), ("Content-Type", "application/json"),
        ("DPoP", p1), ("DPoP", p2)])
    assert r.status_code == 400 and code(r) == "dpop_proof_malformed"


# -- the session key and its certify -----------------------------------------------------------


def test_session_start_needs_a_certified_key_and_its_proof(agent: Agent,
                                                           client: TestClient) -> None:
    verdict = agent.attest()
    token = verdict["token"]
    # No proof at all, then a proof by another key.
    r = agent.send("POST", "/v1/sessions", None, {"attestation_token": token})
    assert r.status_code == 401 and code(r) == "dpop_proof_missing"
    thief = SoftSessionKey()
    body = json.dumps({"attestation_token": token}).encode()
    r = agent.send("POST", "/v1/sessions", None, {"attestation_token": token},
                   proof=agent.proof("POST", "/v1/sessions", verdict["attestation_id"], body,
                                     signer=thief.sign, jwk=thief.jwk))
    assert code(r) == "dpop_key_mismatch"
    # A token without a session key starts nothing.
    n = nonce(agent.client, agent.tenant)
    plain = client.post("/v1/attestation/verify", headers=agent.tenant.headers("agent"),
                        json=evidence(agent.tpm, n, manifest_for(agent.tpm, PUBLISHER[0])))
    assert plain.json()["status"] == "affirming"
    r = agent.send("POST", "/v1/sessions", None, {"attestation_token": plain.json()["token"]})
    assert r.status_code == 422 and code(r) == "session_key_required"
    # The honest proof still works afterwards (nothing was consumed by the refusals).
    r = agent.send("POST", "/v1/sessions", verdict["attestation_id"],
                   {"attestation_token": token})
    assert r.status_code == 201, r.text


def _failures(verdict: dict[str, Any]) -> list[str]:
    assert verdict["status"] == "contraindicated" and verdict["token"] is None
    return [f["code"] for f in verdict["failures"]]


def test_software_key_claiming_tpm_attributes(agent: Agent) -> None:
    """A key made in software, wrapped in a public area that claims fixedTPM: the TPM will not
    certify it (no authValue for a public-only object), so the attacker sends it with the
    certify of a real key, and the certified name gives it away."""
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SIG_SCHEME

    soft = SoftSessionKey().private.public_key().public_numbers()
    fake = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=sw.SESSION_KEY_ATTRS)
    fake.publicArea.unique.ecc.x = soft.x.to_bytes(32, "big")
    fake.publicArea.unique.ecc.y = soft.y.to_bytes(32, "big")
    handle = agent.tpm.esapi.load_external(fake, None, sw.ESYS_TR.OWNER)
    try:
        with pytest.raises(Exception, match="authValue or authPolicy is not available"):
            agent.tpm.esapi.certify(handle, agent.tpm.aks["ak"][0], b"n" * 32,
                                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
    finally:
        agent.tpm.esapi.flush_context(handle)
    verdict = agent.attest(session_key=b64(fake.marshal()))
    assert _failures(verdict) == ["session_key_certify_name_mismatch"]


def test_key_certified_by_another_tpms_ak(agent: Agent, other_tpm: sw.SwTpm) -> None:
    public = other_tpm.new_session_key()
    n = nonce(agent.client, agent.tenant)
    attest, sig = other_tpm.certify_session_key(n)
    body = evidence(agent.tpm, n, manifest_for(agent.tpm, PUBLISHER[0])) | {
        "session_key": b64(public), "session_key_certify": b64(attest),
        "session_key_signature": b64(sig)}
    r = agent.client.post("/v1/attestation/verify", json=body,
                          headers=agent.tenant.headers("agent"))
    assert _failures(r.json()) == ["session_key_certify_signature_invalid"]


def test_certify_over_another_nonce(agent: Agent) -> None:
    verdict = agent.attest(certify_nonce=b"\x01" * 40)
    assert _failures(verdict) == ["session_key_certify_nonce_mismatch"]


def test_certify_signed_by_the_session_key_itself(agent: Agent) -> None:
    """An unrestricted key can sign a forged TPMS_ATTEST: only the AK's signature counts."""
    from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
    from tpm2_pytss.types import TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

    n = nonce(agent.client, agent.tenant)
    body = evidence(agent.tpm, n, manifest_for(agent.tpm, PUBLISHER[0]))
    public = agent.tpm.new_session_key()
    attest, _ = agent.tpm.certify_session_key(n)
    import hashlib

    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.any.hashAlg = TPM2_ALG.SHA256
    self_signed = agent.tpm.esapi.sign(
        agent.tpm.session_key_handle, hashlib.sha256(attest).digest(), scheme,
        TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL))
    body |= {"session_key": b64(public), "session_key_certify": b64(attest),
             "session_key_signature": b64(self_signed.marshal())}
    r = agent.client.post("/v1/attestation/verify", json=body,
                          headers=agent.tenant.headers("agent"))
    assert _failures(r.json()) == ["session_key_certify_signature_invalid"]


@pytest.mark.parametrize(("attributes", "expected"), [
    # Duplicable: fixedTPM and fixedParent clear.
    (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH,
     "session_key_attributes_invalid"),
    # Restricted: it could only sign TPM-generated data, and is an AK's shape.
    (sw.SESSION_KEY_ATTRS | TPMA_OBJECT.RESTRICTED, "session_key_attributes_invalid"),
])
def test_duplicable_or_restricted_session_key(agent: Agent, attributes: TPMA_OBJECT,
                                              expected: str) -> None:
    n = nonce(agent.client, agent.tenant)
    body = evidence(agent.tpm, n, manifest_for(agent.tpm, PUBLISHER[0]))
    public = agent.tpm.new_session_key(attributes)
    attest, sig = agent.tpm.certify_session_key(n)
    body |= {"session_key": b64(public), "session_key_certify": b64(attest),
             "session_key_signature": b64(sig)}
    r = agent.client.post("/v1/attestation/verify", json=body,
                          headers=agent.tenant.headers("agent"))
    assert _failures(r.json()) == [expected]


@pytest.mark.parametrize("field", ["session_key", "session_key_certify",
                                   "session_key_signature"])
def test_tampered_session_key_evidence(agent: Agent, field: str) -> None:
    n = nonce(agent.client, agent.tenant)
    body = evidence(agent.tpm, n, manifest_for(agent.tpm, PUBLISHER[0]))
    public = agent.tpm.new_session_key()
    attest, sig = agent.tpm.certify_session_key(n)
    body |= {"session_key": b64(public), "session_key_certify": b64(attest),
             "session_key_signature": b64(sig)}
    raw = bytearray(base64.b64decode(body[field]))
    raw[-3] ^= 0x01
    body[field] = b64(bytes(raw))
    r = agent.client.post("/v1/attestation/verify", json=body,
                          headers=agent.tenant.headers("agent"))
    failures = _failures(r.json())
    assert len(failures) == 1 and failures[0].startswith("session_key_"), failures
