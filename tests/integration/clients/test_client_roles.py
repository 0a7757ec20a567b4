"""sandboxsec-client against a real ``sandboxsec serve``: every role, sync and async, refusals
as typed errors, retry on a real 503 and a wait that survives a dropped connection."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sandboxsec_client import (
    AdminClient,
    AgentClient,
    Approval,
    ApproverClient,
    AsyncAdminClient,
    AsyncAgentClient,
    AsyncApproverClient,
    AsyncAuditorClient,
    AsyncDownstreamClient,
    AuditInvalid,
    AuditorClient,
    AuthenticationError,
    DownstreamClient,
    ForbiddenError,
    GrantInvalid,
    InputError,
    InsecureSignerWarning,
    NotFoundError,
    OutcomeUnknownError,
    ParamsHashMismatchError,
    RetryPolicy,
    SoftwareP256Signer,
    UnavailableError,
    verify_inclusion,
)

from tests.integration.clients.conftest import DroppingProxy, Live, SqliteWriteLock

PAY = {"amount": "120.00", "currency": "EUR", "payee": "acme-gmbh"}
RESOURCE = "payee:acme-gmbh"


def _ask_payment(live: Live, session_id: str, params: dict[str, Any] = PAY) -> str:
    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        d = agent.ask(session_id, "payment", RESOURCE, params)
    assert d.decision == "approval_required" and d.approval_id is not None
    return d.approval_id


def test_agent_approver_downstream_round_trip(live: Live) -> None:
    sid = live.new_session()
    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        assert agent.session(sid).attested
        rec = agent.record(sid, "observation", b"page loaded", {"step": 1})
        assert rec.record_id and rec.size == len(b"page loaded")
        d = agent.ask(sid, "payment", RESOURCE, PAY)
        assert (d.decision, d.rule_id) == ("approval_required", "pay-approval")
        assert d.approval_id is not None and len(d.short_code) == 9
        # bounded: at the timeout the request comes back still pending, without a grant
        waited = agent.wait(d.approval_id, timeout=0.2, poll=0.1)
        assert (waited.state, waited.grant, waited.params) == ("pending", None, PAY)

    with ApproverClient(live.base, live.key("approver")) as approver:
        listed = approver.list_requests(session_id=sid)
        assert [a.id for a in listed] == [d.approval_id]
        shown = listed[0]
        assert shown.short_code == d.short_code
        # params altered after they were shown: refused here, before anything is sent
        altered = Approval(**{**shown.__dict__, "params": {**PAY, "amount": "1200.00"}})
        with pytest.raises(ParamsHashMismatchError):
            approver.approve(altered)
        assert approver.get(shown.id).state == "pending"
        assert approver.approve(shown).state == "approved"

    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        done = agent.wait(d.approval_id, timeout=5)
    assert done.state == "approved" and done.grant is not None
    grant = done.grant

    with DownstreamClient(live.base, None) as offline:
        keys = offline.published_keys()  # public: no key needed
        claims = offline.verify_offline(grant, "payment", PAY, RESOURCE, keys=keys)
        assert (claims.session_id, claims.approval_id) == (sid, d.approval_id)
        for action, params, resource, code in (
            ("payment", {**PAY, "amount": "121.00"}, RESOURCE, "grant_params_mismatch"),
            ("login", PAY, RESOURCE, "grant_action_mismatch"),
            ("payment", PAY, "payee:mallory", "grant_resource_mismatch"),
        ):
            with pytest.raises(GrantInvalid) as bad:
                offline.verify_offline(grant, action, params, resource, keys=keys)
            assert bad.value.code == code
        with pytest.raises(GrantInvalid) as late:
            offline.verify_offline(grant, "payment", PAY, RESOURCE, keys=keys,
                                   now=datetime.now(UTC) + timedelta(days=1))
        assert late.value.code == "grant_expired"
        forged = grant[:-4] + ("AAAA" if not grant.endswith("AAAA") else "BBBB")
        with pytest.raises(GrantInvalid) as sig:
            offline.verify_offline(forged, "payment", PAY, RESOURCE, keys=keys)
        assert sig.value.code in {"grant_signature_invalid", "grant_malformed"}

    with DownstreamClient(live.base, live.key("approver"),
                          proof=live.prove("approver")) as downstream:
        other = downstream.verify_grant(grant, "payment", {**PAY, "amount": "121.00"}, RESOURCE)
        assert (other.valid, other.code) == (False, "grant_params_mismatch")
        first = downstream.verify_grant(grant, "payment", PAY, RESOURCE)
        assert first.valid and first.grant_id == claims.grant_id
        replay = downstream.verify_grant(grant, "payment", PAY, RESOURCE)
        assert (replay.valid, replay.code) == (False, "grant_already_used")


def test_auditor_and_admin(live: Live) -> None:
    sid = live.new_session()
    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        rec = agent.record(sid, "screenshot", b"\x89PNG...", {"w": 2})
    with AuditorClient(live.base, live.key("auditor")) as auditor:
        cp = auditor.checkpoint()
        assert cp.size > 0 and cp.note.startswith(cp.origin)
        assert "BEGIN PUBLIC KEY" in auditor.key().public_key_pem
        export = auditor.export()
        assert export.count(b"\n") >= cp.size
        proof = auditor.inclusion_proof(0)
        assert proof["seq"] == 0 and proof["tree_size"] >= 1
        # checked here, against the key the operator handed over out of band
        pem = live.deployment.public_key().read_text()
        name = auditor.key().key_name
        assert auditor.verified_inclusion(0, pem, name).size == proof["tree_size"]
        for forged, code in (
            ({**proof, "entry": proof["entry"].replace('"seq":0', '"seq":1')},
             "audit_proof_invalid"),
            ({**proof, "seq": 1}, "audit_proof_invalid"),
            ({**proof, "tree_size": proof["tree_size"] + 1}, "audit_proof_invalid"),
            ({**proof, "checkpoint": proof["checkpoint"].replace(
                f"\n{proof['tree_size']}\n", f"\n{proof['tree_size'] + 1}\n", 1)},
             "audit_checkpoint_signature_invalid"),
        ):
            with pytest.raises(AuditInvalid) as bad:
                verify_inclusion(forged, pem, name)
            assert bad.value.code == code
        other_key = Ed25519PrivateKey.generate().public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(AuditInvalid) as unsigned:
            verify_inclusion(proof, other_key, name)
        assert unsigned.value.code == "audit_checkpoint_signature_invalid"
    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        agent.record(sid, "observation", b"later")
    with AuditorClient(live.base, live.key("auditor")) as auditor:
        later = auditor.checkpoint()
        assert later.size > cp.size
        assert auditor.consistency_proof(cp.size, later.size)["second"] == later.size
    with AdminClient(live.base, live.key("admin")) as admin:
        me = admin.whoami()
        assert (me.tenant_id, me.role) == (live.tenant.id, "admin")
        back = admin.read_record(sid, rec.record_id)
        assert (back.data, back.meta, back.kind) == (b"\x89PNG...", {"w": 2}, "screenshot")
        page, _next = admin.trajectory(sid)
        assert rec.record_id in [r.record_id for r in page]
        assert admin.key_status().current_version >= 1
        policy = admin.policy()
        assert admin.validate_policy(policy.text).valid
        broken = admin.validate_policy("p, broken")
        assert (broken.valid, broken.code) == (False, "policy_invalid")
        made = admin.create_api_key("approver", "night shift")
        assert made.key not in repr(made)  # the secret never shows in logs of the object
        with ApproverClient(live.base, made.key) as night:
            night.list_requests()
            admin.revoke_api_key(made.key_id)
            with pytest.raises(AuthenticationError) as revoked:
                night.list_requests()
            assert revoked.value.status == 401
        assert made.key_id in [k.key_id for k in admin.api_keys() if k.revoked_at]


def test_refusals_are_typed_by_family(live: Live) -> None:
    sid = live.new_session()
    aid = _ask_payment(live, sid)
    # another tenant: 404, exactly as for an id that does not exist
    with AgentClient(live.base, live.other.keys["agent"],
                     proof=live.proof(live.other.keys["agent"])) as foreign:
        with pytest.raises(NotFoundError) as nf:
            foreign.approval(aid)
        assert nf.value.code == "not_found"
        with pytest.raises(NotFoundError):
            foreign.record(sid, "observation", b"x")
    # the wrong role: 403
    with ApproverClient(live.base, live.key("agent")) as not_an_approver:
        with pytest.raises(ForbiddenError) as fb:
            not_an_approver.approve(aid, "0" * 64)
        assert fb.value.code == "forbidden"
    # malformed params: 400 with the policy's reason
    with AgentClient(live.base, live.key("agent"), proof=live.prove("agent")) as agent:
        with pytest.raises(InputError) as bad:
            agent.ask(sid, "payment", RESOURCE, {**PAY, "amount": 120.5})
        assert bad.value.status == 400 and bad.value.code != "http_400"
    # an unknown key: 401
    with AgentClient(live.base, "ssk_0000000000000000_" + "A" * 43) as stranger:
        with pytest.raises(AuthenticationError):
            stranger.approval(aid)


def test_async_clients_every_role(live: Live) -> None:
    sid = live.new_session()

    async def run() -> None:
        async with AsyncAgentClient(live.base, live.key("agent"),
                                    proof=live.prove("agent")) as agent, \
                AsyncApproverClient(live.base, live.key("approver")) as approver, \
                AsyncDownstreamClient(live.base, live.key("agent"),
                                      proof=live.prove("agent")) as downstream, \
                AsyncAuditorClient(live.base, live.key("auditor")) as auditor, \
                AsyncAdminClient(live.base, live.key("admin")) as admin:
            rec = await agent.record(sid, "action", b'{"click": [1, 2]}')
            d = await agent.ask(sid, "payment", RESOURCE, PAY)
            assert d.approval_id is not None
            result: dict[str, Approval] = {}

            async def wait() -> None:
                result["a"] = await agent.wait(d.approval_id or "", timeout=30, poll=10)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                shown = await approver.get(d.approval_id)
                await approver.deny(shown)
            assert result["a"].state == "denied" and result["a"].grant is None
            check = await downstream.verify_grant("sgr1.e30.AAAA", "payment", PAY)
            assert not check.valid and check.code in {"grant_malformed",
                                                      "grant_signature_invalid"}
            assert (await auditor.checkpoint()).size > 0
            assert (await admin.read_record(sid, rec.record_id)).data == b'{"click": [1, 2]}'

    anyio.run(run)


def test_retry_on_503_then_success(live: Live) -> None:
    db = live.sqlite_path()
    if db is None:
        pytest.skip("the held-lock outage is SQLite's; PostgreSQL outages: e2e/test_faults.py")
    sid = live.new_session()
    lock = SqliteWriteLock(db)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        # The client is about to retry after a refusal: the outage ends now.
        slept.append(seconds)
        lock.release()

    try:
        with AgentClient(live.base, live.key("agent"),
                         proof=live.prove("agent"), sleep=sleep) as agent:
            rec = agent.record(sid, "observation", b"written after the outage")
    finally:
        lock.release()
    assert slept == [1.0]  # the service's Retry-After, not a guess
    with AdminClient(live.base, live.key("admin")) as admin:
        records, _ = admin.trajectory(sid)
    # exactly one record: the refused attempt left nothing behind
    assert [r.data for r in records] == [b"written after the outage"]
    assert records[0].record_id == rec.record_id

    # retries are bounded: a longer outage ends in the family error, nothing written
    lock = SqliteWriteLock(db)
    try:
        with AgentClient(live.base, live.key("agent"),
                         proof=live.prove("agent"), retry=RetryPolicy(attempts=2),
                         sleep=lambda _s: None) as agent, pytest.raises(UnavailableError) as down:
            agent.record(sid, "observation", b"never")
    finally:
        lock.release()
    assert down.value.status == 503 and down.value.retry_after == 1.0
    with AdminClient(live.base, live.key("admin")) as admin:
        assert len(admin.trajectory(sid)[0]) == 1


def test_wait_survives_a_dropped_connection(live: Live) -> None:
    sid = live.new_session()
    aid = _ask_payment(live, sid)
    port = int(live.base.rsplit(":", 1)[1])
    proxy = DroppingProxy(port)
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        try:
            with AgentClient(proxy.base, live.key("agent"), proof=live.prove("agent")) as agent:
                outcome["approval"] = agent.wait(aid, timeout=120, poll=60)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    try:
        thread.start()
        assert proxy.wait_seen.wait(30), "the wait never reached the service"
        proxy.wait_seen.clear()
        proxy.drop_all()  # the long-poll's connection dies mid-wait
        assert proxy.wait_seen.wait(30), "the client did not resume its wait"
        with ApproverClient(live.base, live.key("approver")) as approver:
            approver.approve(approver.get(aid))
        thread.join(60)
    finally:
        proxy.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["approval"].state == "approved" and outcome["approval"].grant
    assert proxy.wait_requests >= 2


def test_lost_answer_of_a_write_is_reported_not_repeated(live: Live) -> None:
    sid = live.new_session()
    port = int(live.base.rsplit(":", 1)[1])
    proxy = DroppingProxy(port)
    proxy.drop_after_post = True
    try:
        with AgentClient(proxy.base, live.key("agent"), proof=live.prove("agent")) as agent, \
                pytest.raises(OutcomeUnknownError):
            agent.record(sid, "observation", b"maybe")
    finally:
        proxy.close()
    # sent once, never repeated by the client
    assert proxy.posts == 1
    with AdminClient(live.base, live.key("admin")) as admin:
        # it did run: a blind repeat would have stored it twice
        assert len(admin.trajectory(sid)[0]) == 1


def test_built_in_prover_signs_with_the_attested_key_sync_and_async(live: Live) -> None:
    """No ``proof=``: the async agent attests (its TPM certifies a fresh session key), starts
    the session and acts, every proof signed by that key through the attester; a second
    process holding the key (``session_key=``, ``session_id=``) waits on the approval; a client
    with a key the AK never certified is refused."""
    manifest = live.deployment.trust.manifest.encode()

    async def run() -> tuple[str, str]:
        async with AsyncAgentClient(live.base, live.key("agent")) as agent:
            verdict = await agent.attest(live.sandbox, manifest)
            assert verdict.affirming and verdict.token is not None
            session = await agent.start_session(verdict.token)
            assert agent.prover is not None
            assert agent.prover.session_id == session.session_id
            d = await agent.ask(session.session_id, "payment", RESOURCE, PAY)
            assert d.approval_id is not None
            assert (await agent.approval(d.approval_id)).state == "pending"
            return session.session_id, d.approval_id

    sid, aid = anyio.run(run)
    held = live.sandbox.session_key
    assert held is not None
    with ApproverClient(live.base, live.key("approver")) as approver:
        approver.approve(approver.get(aid))
    with AgentClient(live.base, live.key("agent"), session_key=held, session_id=sid) as other:
        assert other.wait(aid, timeout=10).state == "approved"
        other.record(sid, "observation", b"by the second process")
    with pytest.warns(InsecureSignerWarning):
        stranger = SoftwareP256Signer()
    with AgentClient(live.base, live.key("agent"), session_key=stranger,
                     session_id=sid) as thief, pytest.raises(AuthenticationError) as refused:
        thief.ask(sid, "payment", RESOURCE, PAY)
    assert refused.value.code == "dpop_key_mismatch"
    with AgentClient(live.base, live.key("agent")) as unbound, \
            pytest.raises(AuthenticationError) as missing:
        unbound.ask(sid, "payment", RESOURCE, PAY)
    assert missing.value.code == "dpop_proof_missing"
