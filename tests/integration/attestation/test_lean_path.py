"""The lean attestation path, through the API on SQLite and PostgreSQL: 32-byte stateless nonces
(optionally bound to one AK), no state or audit entry for a challenge, the verdict recording
its nonce, and the per-process binding cache that a second service instance (another worker)
cannot fool."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import delete, func, select

from sandboxsec.attestation.config import AttestationConfig
from sandboxsec.attestation.models import AttestationNonce, BoundAk
from sandboxsec.attestation.service import AttestationService
from sandboxsec.attestation.trust import Revocations
from sandboxsec.attestation.verifier import Evidence
from sandboxsec.audit.events import AuditEvent
from sandboxsec.clock import FixedClock
from sandboxsec.crypto.service_keys import ATTESTATION_NONCE
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys
from tests.integration.attestation.conftest import SoftMachine, Submit, nonce_for
from tests.support.softtpm import SoftAk, marshal_quote, sign_quote


def codes(verdict: dict[str, Any]) -> list[str]:
    return [f["code"] for f in verdict["failures"]]


def challenge(client: TestClient, tenant: TenantKeys, **body: Any) -> Any:
    return client.post("/v1/attestation/challenge", headers=tenant.headers("agent"), json=body)


def test_nonce_is_32_bytes_stateless_and_recorded_by_its_verdict(
    bound: SoftMachine, submit: Submit, client: TestClient, tenant: TenantKeys,
    services: Services,
) -> None:
    before = services.audit.entries(tenant.id)
    nonce = nonce_for(client, tenant)
    # 32 bytes: the TPM2B_DATA limit of a TPM with only SHA-256 banks.
    assert len(nonce) == 32
    # Issuing wrote nothing: no audit entry, no row.
    assert services.audit.entries(tenant.id) == before
    with services.db.session() as s:
        assert s.execute(select(func.count()).select_from(AttestationNonce)).scalar_one() == 0
    verdict = submit(nonce, clock=2000)
    assert verdict["status"] == "affirming"
    entries = services.audit.entries(tenant.id, event=AuditEvent.ATTESTATION_VERDICT)
    assert entries[-1]["object_ids"]["nonce"] == nonce.hex()
    assert entries[-1]["object_ids"]["attestation_id"] == verdict["attestation_id"]
    # Consumed in the verdict's transaction: one row, and a second use is a replay.
    with services.db.session() as s:
        assert s.execute(select(func.count()).select_from(AttestationNonce)).scalar_one() == 1
    assert codes(submit(nonce, clock=2001)) == ["attestation_nonce_replayed"]


def test_forged_and_altered_nonces_are_unknown(
    bound: SoftMachine, submit: Submit, client: TestClient, tenant: TenantKeys,
) -> None:
    nonce = nonce_for(client, tenant)
    # A MAC under another key; a flipped bit in each of kind, random, expiry and MAC.
    head = nonce[:16]
    forged = head + hmac.new(b"x" * 32, head, hashlib.sha256).digest()[:16]
    assert codes(submit(forged, clock=2000)) == ["attestation_nonce_unknown"]
    for index in (0, 5, 13, 20, 31):
        flipped = bytearray(nonce)
        flipped[index] ^= 0x01
        assert codes(submit(bytes(flipped), clock=2000)) == ["attestation_nonce_unknown"]
    # A later expiry written over the real one.
    later = struct.unpack(">I", nonce[12:16])[0] + 3600
    extended = nonce[:12] + struct.pack(">I", later) + nonce[16:]
    assert codes(submit(extended, clock=2000)) == ["attestation_nonce_unknown"]
    # The genuine nonce was not consumed by any of those.
    assert submit(nonce, clock=2000)["status"] == "affirming"


def test_expired_and_other_tenants_nonces(
    bound: SoftMachine, submit: Submit, client: TestClient, tenant: TenantKeys,
    other_tenant: TenantKeys, clock: FixedClock, services: Services,
) -> None:
    theirs = nonce_for(client, other_tenant)
    assert codes(submit(theirs, clock=2000)) == ["attestation_nonce_unknown"]
    mine = nonce_for(client, tenant)
    clock.advance(services.settings.nonce_ttl_seconds + 1)
    assert codes(submit(mine, clock=2000)) == ["attestation_nonce_expired"]


def test_nonce_bound_to_one_ak(
    bound: SoftMachine, submit: Submit, client: TestClient, tenant: TenantKeys,
) -> None:
    name = bound.ak.name.hex()
    r = challenge(client, tenant, ak_name=name)
    assert r.status_code == 200, r.text
    nonce = base64.b64decode(r.json()["nonce"])
    assert len(nonce) == 32
    assert submit(nonce, clock=2000)["status"] == "affirming"
    # A nonce bound to another AK's name is unknown to this AK's quote.
    other = challenge(client, tenant, ak_name=SoftAk().name.hex()).json()["nonce"]
    assert codes(submit(base64.b64decode(other), clock=2001)) == ["attestation_nonce_unknown"]
    # Bad names are 400 with a reason code, never 500.
    for bad in ("zz", "00", "0" * 140, "٠١٢٣"):
        r = challenge(client, tenant, ak_name=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] == "attestation_evidence_malformed"


def test_nonce_of_the_previous_format_is_still_answered(
    bound: SoftMachine, submit: Submit, tenant: TenantKeys, services: Services,
) -> None:
    """A challenge issued just before an upgrade (40 bytes, format 1) stays answerable."""
    key = services.service_keys.secret(ATTESTATION_NONCE)
    expiry = int((services.clock.now() + timedelta(seconds=60)).timestamp())
    head = bytes([1]) + b"\x42" * 15 + struct.pack(">I", expiry)
    t = tenant.id.encode()
    old = head + hmac.new(key, b"sandboxsec attestation nonce v1\x00" + struct.pack(">H", len(t))
                          + t + head, hashlib.sha256).digest()[:20]
    assert submit(old, clock=2000)["status"] == "affirming"
    assert codes(submit(old, clock=2001)) == ["attestation_nonce_replayed"]


def _second_worker(services: Services, machine: SoftMachine) -> AttestationService:
    """Another worker process's attestation service: same database, its own caches."""
    s = services.settings
    config = AttestationConfig(home=s.home, trust_dir=s.resolved_trust_dir(),
                               nonce_ttl_seconds=s.nonce_ttl_seconds,
                               token_ttl_seconds=s.attestation_token_ttl_seconds,
                               max_event_log_bytes=s.max_body_bytes)
    other = AttestationService(services.db, services.clock, services.audit_writer, config,
                               nonce_key=lambda: services.service_keys.secret(ATTESTATION_NONCE))
    other.configure_trust(publishers=machine.publisher.trust(),
                          ek_roots=[machine.manufacturer.cert])
    return other


def _evidence(machine: SoftMachine, nonce: bytes, clock: int) -> Evidence:
    q = marshal_quote(nonce, {"sha256": machine.pcrs}, clock=clock)
    return Evidence(nonce=nonce, quote=q, signature=sign_quote(machine.ak, q),
                    ak_public=machine.ak.public, pcrs={"sha256": machine.pcrs},
                    image_manifest=machine.manifest, event_log=machine.log)


def test_a_stale_binding_cache_never_decides(
    bound: SoftMachine, tenant: TenantKeys, services: Services,
) -> None:
    who = Principal(tenant_id=tenant.id, key_id="k", role=Role.AGENT)
    a, b = services.attestation, _second_worker(services, bound)
    # Both workers have the binding cached.
    assert a.verify(who, _evidence(bound, a.issue_nonce(who).nonce, 2000)).result.affirming
    assert b.verify(who, _evidence(bound, b.issue_nonce(who).nonce, 2005)).result.affirming
    # a's snapshot says clock 2000; the stored clock is 2005.  A rolled-back clock is refused
    # by a, although its snapshot would have let it through.
    stale = a.verify(who, _evidence(bound, a.issue_nonce(who).nonce, 2003)).result
    assert stale.failure_codes == ("quote_clock_rollback",), stale.failure_codes
    # A fresh clock passes on a (its snapshot was corrected by the locked read).
    assert a.verify(who, _evidence(bound, a.issue_nonce(who).nonce, 2006)).result.affirming
    with services.db.session() as s:
        last = s.execute(select(BoundAk.last_clock)).scalar_one()  # type: ignore[arg-type]
    assert last == "2006"


def test_unbound_and_rebound_aks_take_effect_at_once(
    bound: SoftMachine, tenant: TenantKeys, services: Services,
) -> None:
    who = Principal(tenant_id=tenant.id, key_id="k", role=Role.AGENT)
    a, b = services.attestation, _second_worker(services, bound)
    assert a.verify(who, _evidence(bound, a.issue_nonce(who).nonce, 2000)).result.affirming
    assert b.verify(who, _evidence(bound, b.issue_nonce(who).nonce, 2001)).result.affirming
    # The AK is unbound (its row removed) behind both workers' backs.
    with services.db.session() as s:
        row = s.execute(select(BoundAk)).scalar_one()
        kept = {c: getattr(row, c) for c in BoundAk.model_fields}
        s.execute(delete(BoundAk))
    for svc, tick in ((a, 2002), (b, 2003)):
        result = svc.verify(who, _evidence(bound, svc.issue_nonce(who).nonce, tick)).result
        assert not result.affirming
        assert "ak_not_bound" in result.failure_codes, result.failure_codes
    # Bound again (a new row, no clock yet): both workers pick it up at once.
    with services.db.session() as s:
        s.add(BoundAk(**{**kept, "id": "ak_rebound", "last_clock": None,
                         "last_reset_count": None, "last_restart_count": None}))
    for svc, tick in ((a, 1500), (b, 1600)):
        result = svc.verify(who, _evidence(bound, svc.issue_nonce(who).nonce, tick)).result
        assert result.affirming, result.failure_codes
    # The EK is revoked: a cached binding is still checked against it on every verdict.
    revoked = Revocations(fingerprints=frozenset({hashlib.sha256(bound.ek_der).hexdigest()}))
    for svc in (a, b):
        svc.configure_trust(publishers=bound.publisher.trust(revoked))
    for svc, tick in ((a, 1700), (b, 1800)):
        result = svc.verify(who, _evidence(bound, svc.issue_nonce(who).nonce, tick)).result
        assert "cert_revoked" in result.failure_codes, result.failure_codes
