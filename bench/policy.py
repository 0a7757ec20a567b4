"""Policy decisions and approval wake-ups, measured in one run.

Prints:

1. decisions/s and p50/p99 latency of ``PolicyEngine.decide`` (in process) with 1 tenant x 10
   rules and with 10,000 tenants x 10 rules each (100,000 rules, every tenant's policy
   distinct), beside the raw primitive (casbin ``enforce_ex`` on the same 10-rule enforcer)
   and one plain casbin enforcer holding all 100,000 rules (what a single shared enforcer
   costs), with the ratios;
2. approve-to-wake latency: from the approve call to the return of an agent already waiting
   on ``wait`` (SQLite in one process; PostgreSQL across two workers via LISTEN/NOTIFY when
   the PostgreSQL binaries are present), for an approver API key (the machine path) and for
   a person's passkey-signed approval: the call then includes verifying the WebAuthn
   assertion (challenge, origin, rpIdHash, flags, counter, ES256 signature), using up its
   challenge, recording the vote and the assertion in the audit log.  The authenticator's own
   signing (on the person's device) is outside the measured span; the raw assertion check
   (``verify_assertion`` alone) is printed beside it.

The decision figures are for the configuration the service ships with (default
``policy_cache_size``, no ``gc.freeze()``: the service does not freeze its heap), with the
number of cache misses and the cyclic collections that ran during the measured decisions;
then, labelled, with a cache smaller than the tenant count, where about 60 % of decisions
recompile their tenant's policy.  The memory a cached tenant with a distinct policy costs is
printed first.  The PostgreSQL case runs on a throwaway cluster with ``fsync`` on, as
production does.

Aims: p99 < 200 us per decision at 10,000 tenants; approve-to-wake p99 < 50 ms.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import casbin
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sandboxsec.people.service import PersonPrincipal
from sandboxsec.policy.approvals import ApprovalEvent
from sandboxsec.policy.engine import (
    ActionContext,
    CompiledPolicy,
    PolicyEngine,
    _cached_line_rule,
    _cached_line_tokens,
    _Request,
    bundled_default_policy,
    bundled_model,
    compile_policy,
)
from sandboxsec.policy.views import ApprovalView
from sandboxsec.principal import Principal, Role
from sandboxsec.sandbox.passkey import SoftPasskey
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database

TENANTS = 10_000


def tenant_policy(i: int) -> str:
    """Ten rules; thresholds depend on ``i`` so no two tenants share a compiled policy."""
    limit = 1000 + i
    return "\n".join([
        "p, pay-unattested, payment, *, attested == false, deny",
        f"p, pay-over-limit, payment, *, amount > {limit}, deny",
        "p, pay-currency, payment, *, currency notin EUR|USD|GBP|CHF, deny",
        f"p, pay-blocked, payment, payee:blocked-{i}*, true, deny",
        f"p, pay-approval, payment, *, amount > {i % 50}, approval_required",
        f"p, pay-small, payment, *, amount <= {i % 50}, allow",
        "p, login-new-domain, login, *, new_domain == true, approval_required",
        "p, login-known-domain, login, *, new_domain == false, allow",
        "p, message-attested, message, *, attested == true, allow",
        "p, download-approval, file_download, *, true, approval_required",
    ]) + "\n"


def ctx_for(i: int, rnd: random.Random) -> ActionContext:
    return ActionContext(
        tenant_id=f"tn_{i}", role="agent", session_id="ses_1", attested=True,
        image_name="agent-runtime:1.4", image_digest="sha256:ab", action="payment",
        resource="payee:acme", amount=Decimal(rnd.randrange(0, 3000)), currency="EUR",
        payee="acme",
    )


@functools.cache
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(p) for p in pattern.split("*")), re.DOTALL)


def res_match(resource: str, pattern: str) -> bool:
    return pattern == "*" or _pattern(pattern).fullmatch(resource) is not None


def latencies(fn: Callable[[int], object], n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def summary(label: str, samples: list[float], base: float | None = None) -> float:
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    per_s = len(samples) / sum(samples)
    ratio = f"  x{p50 / base:6.2f} of raw p50" if base else ""
    print(f"  {label:<44} {per_s:>10,.0f}/s  p50 {p50 * 1e6:8.1f} us  "
          f"p99 {p99 * 1e6:9.1f} us{ratio}")
    return p50


class _GcWatch:
    """Counts cyclic collections and their time per generation while installed."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start

    def __enter__(self) -> _GcWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *_exc: object) -> None:
        gc.callbacks.remove(self)

    def describe(self) -> str:
        return ", ".join(f"gen{g} x{self.count[g]} {self.seconds[g] * 1e3:.1f} ms"
                         for g in range(3))


def _decide_at_scale(engine: PolicyEngine, texts: list[str], ctx0: ActionContext, base: float,
                     rnd: random.Random, *, label: str) -> float:
    """p50/p99 of one engine at 1 tenant and at TENANTS tenants; returns the TENANTS p50."""
    single = latencies(lambda _i: engine.decide(ctx0, version=1, load_text=lambda: texts[0]),
                       20_000)
    summary(f"engine ({label}), 1 tenant x 10 rules", single, base)
    start = time.perf_counter()
    for i in range(TENANTS):
        engine.policy_for(f"tn_{i}", 1, functools.partial(texts.__getitem__, i))
    print(f"  (compiled {TENANTS:,} tenant policies in {time.perf_counter() - start:.1f} s)")
    ctxs = [ctx_for(rnd.randrange(TENANTS), rnd) for _ in range(50_000)]
    gc.collect()
    misses = [0]

    def load(tenant: int) -> str:
        misses[0] += 1
        return texts[tenant]

    def decide_many(k: int) -> object:
        c = ctxs[k]
        return engine.decide(c, version=1,
                             load_text=functools.partial(load, int(c.tenant_id[3:])))

    with _GcWatch() as watch:
        many = latencies(decide_many, len(ctxs))
    p50_many = summary(f"engine ({label}), {TENANTS:,} tenants x 10 rules", many, base)
    print(f"    cache misses (recompiles) {misses[0]:,} of {len(ctxs):,}; "
          f"cyclic gc during the run: {watch.describe()}")
    # The same decisions again, timed in CPU time of this thread: on a shared machine a
    # wall-clock tail can be time spent descheduled rather than work.  Shown beside, not
    # instead of, the wall-clock figures above.
    cpu = []
    for k in range(len(ctxs)):
        start = time.thread_time()
        decide_many(k)
        cpu.append(time.thread_time() - start)
    cpu.sort()
    print(f"    same decisions in thread CPU time: p50 {cpu[len(cpu) // 2] * 1e6:.1f} us, "
          f"p99 {cpu[int(len(cpu) * 0.99)] * 1e6:.1f} us")
    ordered = sorted(many)
    p99 = ordered[int(len(ordered) * 0.99)]
    print(f"  aim p99 < 200 us at {TENANTS:,} tenants ({label}): "
          f"{'met' if p99 < 200e-6 else 'MISSED'}")
    return p50_many


def memory_per_tenant(texts: list[str], n: int = 2000) -> float:
    """Bytes allocated per cached tenant whose policy is distinct (its lines parsed afresh)."""
    for cached in (_cached_line_tokens, _cached_line_rule):
        cached.cache_clear()
    engine = PolicyEngine(cache_size=n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        engine.policy_for(f"tn_{i}", 1, functools.partial(texts.__getitem__, i))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / n


class _CompiledMatcherEnforcer(casbin.Enforcer):  # type: ignore[misc]
    """casbin's own ``enforce_ex`` loop over one policy's rows, with the model's matcher
    compiled once as the engine compiles it (the raw primitive of a decision)."""

    def __init__(self, policy: CompiledPolicy) -> None:
        super().__init__(casbin.Enforcer.new_model(text=bundled_model()))
        self._matcher = policy._plan.matcher
        self.add_named_policies("p", policy.casbin_rows)

    def _get_expression(self, expr: str, functions: object = None) -> object:
        return self._matcher


def bench_decisions() -> None:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"== policy decisions (in process); load average {load} on {os.cpu_count()} CPUs")
    rnd = random.Random(7)
    texts = [tenant_policy(i) for i in range(TENANTS)]
    shipped_cache = int(Settings.model_fields["policy_cache_size"].default)
    per_tenant = memory_per_tenant([tenant_policy(i) for i in range(TENANTS, TENANTS + 2000)])
    print(f"  memory per cached tenant with a distinct 10-rule policy: {per_tenant / 1024:.1f} KiB"
          f" (default policy_cache_size={shipped_cache:,}: at most "
          f"{per_tenant * shipped_cache / 2**20:.0f} MiB; tenants sharing a policy text share "
          "one compiled policy)")
    # Raw primitive: casbin enforce_ex on the same compiled 10-rule policy.
    one = compile_policy(tenant_policy(0))
    ctx0 = ctx_for(0, rnd)
    enforcer = _CompiledMatcherEnforcer(one)
    req0 = _Request(ctx0, {r.rule_id: r for r in one.rules})
    for _ in range(200):
        enforcer.enforce_ex(ctx0.action, ctx0.resource, req0)
    raw = latencies(lambda _i: enforcer.enforce_ex(ctx0.action, ctx0.resource, req0), 20_000)
    base = summary("raw casbin enforce_ex, 10 rules", raw)
    # The same rules in a stock casbin Enforcer, which re-parses and interprets its matcher
    # with simpleeval on every call (what _CompiledMatcher saves).
    stock = casbin.Enforcer(casbin.Enforcer.new_model(text=bundled_model()))
    stock.add_function("resMatch", res_match)
    stock.add_function("when", lambda rc, rid: rc.rules[rid].matches_condition(rc.ctx))
    stock.add_named_policies("p", one.casbin_rows)
    stock_lat = latencies(lambda _i: stock.enforce_ex(ctx0.action, ctx0.resource, req0), 5_000)
    summary("stock casbin enforce_ex (simpleeval), 10 rules", stock_lat, base)

    # The configuration the service ships with: the default policy cache and no gc.freeze()
    # (the service does not freeze its heap).
    print(f"  -- shipped configuration: policy_cache_size={shipped_cache:,} (default), "
          "no gc.freeze")
    engine = PolicyEngine(cache_size=shipped_cache)
    p50_many = _decide_at_scale(engine, texts, ctx0, base, rnd, label="shipped")
    # More tenants than the cache holds: about 60 % of decisions recompile a policy.
    small = 4096
    print(f"  -- policy_cache_size={small:,} (fewer than the {TENANTS:,} tenants: misses "
          "recompile), no gc.freeze")
    _decide_at_scale(PolicyEngine(cache_size=small), texts, ctx0, base, rnd,
                     label=f"cache {small:,}")

    # One plain enforcer over every tenant's rules, tenant as a column.
    model = casbin.Enforcer.new_model(text="""
[request_definition]
r = tenant, act, res, ctx
[policy_definition]
p = tenant, id, act, res, cond, decision
[policy_effect]
e = priority(p.eft) || deny
[matchers]
m = r.tenant == p.tenant && (p.act == "*" || r.act == p.act) && resMatch(r.res, p.res) \
&& when(r.tenant, r.ctx, p.id)
""")
    plain = casbin.Enforcer(model)
    compiled = [engine.policy_for(f"tn_{i}", 1, functools.partial(texts.__getitem__, i))
                for i in range(TENANTS)]
    by_id = [{r.rule_id: r for r in c.rules} for c in compiled]
    plain.add_function("resMatch", res_match)
    plain.add_function(
        "when", lambda t, c, rid: by_id[int(t[3:])][rid].matches_condition(c))
    rows = [[f"tn_{i}", r.rule_id, r.action, r.resource, r.condition, r.outcome.value]
            for i in range(TENANTS) for r in compiled[i].rules]
    # Set the rows directly: casbin's add_policies checks duplicates by scanning a list, which
    # is quadratic at this size.
    plain.get_model()["p"]["p"].policy = rows
    sample = [ctx_for(rnd.randrange(TENANTS), rnd) for _ in range(20)]

    def plain_decide(k: int) -> object:
        c = sample[k]
        return plain.enforce_ex(c.tenant_id, c.action, c.resource, replace(c))

    flat = latencies(plain_decide, len(sample))
    p50_flat = summary(f"plain casbin, one enforcer, {len(rows):,} rules", flat, base)
    print(f"  per-tenant engine is x{p50_flat / p50_many:,.0f} faster (p50) than one "
          f"enforcer over {len(rows):,} rules")


def _setup(url: str, home: Path, *, migrate: bool = True
           ) -> tuple[Services, Principal, Principal, str]:
    db = Database(url)
    if migrate:
        db.migrate()
    services = Services(Settings(home=home), db=db)
    from tests.support.benchconfig import describe

    print("  " + describe(services.settings, database="PostgreSQL 15, fsync on"
                          if url.startswith("postgresql") else
                          "SQLite WAL, synchronous=NORMAL (shipped)"))
    created = services.tenants.create(f"bench-{time.time_ns()}")
    tenant = created.tenant_id
    agent = Principal(tenant, created.keys[Role.AGENT].key_id, Role.AGENT)
    approver = Principal(tenant, created.keys[Role.APPROVER].key_id, Role.APPROVER)
    admin = Principal(tenant, created.keys[Role.ADMIN].key_id, Role.ADMIN)
    # The machine path: approver keys may decide payments (the default policy gives them to
    # the session's owner, signing with a passkey).
    services.policy.replace_policy(admin, bundled_default_policy().replace(
        ", owner, 1, passkey", ", anyone, 1, key"))
    from datetime import timedelta

    from sandboxsec.ids import new_id
    from sandboxsec.sessions.models import AgentSession

    now = services.clock.now()
    sid = new_id("ses")
    with services.db.session() as s:
        s.add(AgentSession(id=sid, tenant_id=tenant, image_name="bench", attested=True,
                           created_at=now, expires_at=now + timedelta(hours=1)))
    return services, agent, approver, sid


def _person(services: Services, agent: Principal) -> tuple[PersonPrincipal, SoftPasskey, str]:
    """A person with a software passkey, signed in, owning a new session of the tenant."""
    admin_key = services.tenants.create_key(agent.tenant_id, Role.ADMIN, actor=None)
    admin = Principal(agent.tenant_id, admin_key.key_id, Role.ADMIN)
    services.policy.replace_policy(admin, bundled_default_policy())
    _, link = services.people.create_person(admin, name="Bench Person",
                                            handle=f"p{time.time_ns()}", groups=[])
    token = link.token
    device = SoftPasskey(rp_id=services.settings.webauthn_rp_id,
                         origin=services.settings.public_origin)
    options = services.people.enrolment_options(token)
    services.people.register(token, options["challenge_id"], device.create(options))
    options = services.people.signin_options()
    person = services.people.signin(options["challenge_id"], device.get(options)).person
    from datetime import timedelta

    from sandboxsec.ids import new_id
    from sandboxsec.sessions.models import AgentSession

    now = services.clock.now()
    sid = new_id("ses")
    with services.db.session() as s:
        s.add(AgentSession(id=sid, tenant_id=agent.tenant_id, image_name="bench",
                           attested=True, created_at=now,
                           expires_at=now + timedelta(hours=1)))
    services.people.assign_owner(admin, sid, person.person_id)
    return person, device, sid


def approve_to_wake(label: str, decider: Services, waiter_svc: Services, agent: Principal,
                    approver: Principal, sid: str, rounds: int,
                    passkey: tuple[PersonPrincipal, SoftPasskey] | None = None) -> list[float]:
    """Approve-to-wake samples (seconds); with ``passkey`` the person approves by assertion."""
    params = {"amount": "10.00", "currency": "EUR"}
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    samples = []
    try:
        for _ in range(rounds):
            result = decider.policy.request_action(agent, session_id=sid, action="payment",
                                                   resource="payee:acme", params=params)
            assert result.approval is not None
            aid = result.approval.id
            woke: list[float] = []

            async def wait(aid: str = aid, woke: list[float] = woke) -> ApprovalView:
                view = await waiter_svc.policy.wait(agent, aid, 10.0)
                woke.append(time.perf_counter())
                return view

            future = asyncio.run_coroutine_threadsafe(wait(), loop)
            while waiter_svc.policy.wakeups.waiting() == 0:
                time.sleep(0.001)
            time.sleep(0.005)  # let the waiter park on its event
            if passkey is None:
                start = time.perf_counter()
                decider.policy.decide(approver, aid, ApprovalEvent.APPROVE, result.params_hash)
            else:
                person, device = passkey
                challenge = decider.person_approvals.challenge(person, aid, "approve")
                options = {"publicKey": challenge["publicKey"]}
                credential = device.get(options)  # on the person's device: not measured
                start = time.perf_counter()
                decider.person_approvals.decide(
                    person, aid, "approve", params_hash=result.params_hash,
                    challenge_id=challenge["challenge_id"], credential=credential)
            view = future.result(15)
            assert view.state.value == "approved"
            samples.append(woke[0] - start)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    ordered = sorted(samples)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    verdict = "met" if p99 < 0.050 else "MISSED"
    print(f"  {label:<52} p50 {p50 * 1e3:7.2f} ms  p99 {p99 * 1e3:7.2f} ms  "
          f"(aim p99 < 50 ms: {verdict})")
    return samples


def assertion_check_alone(rounds: int = 500) -> float:
    """p50 seconds of the raw primitive: ``verify_assertion`` on a good ES256 assertion."""
    from sandboxsec.people.passkeys import (
        authentication_options,
        parse_assertion,
        registration_options,
        verify_assertion,
        verify_registration,
    )

    origin, rp = "http://localhost:8000", "localhost"
    device = SoftPasskey(rp_id=rp, origin=origin)
    reg_opts = {"publicKey": registration_options(
        rp_id=rp, rp_name="bench", user_handle=b"u" * 32, handle="bench", display_name="B",
        challenge=b"r" * 32, exclude=[], timeout_ms=1000)}
    reg = verify_registration(device.create(reg_opts), challenge=b"r" * 32, rp_id=rp,
                              origins=[origin])
    challenge = b"c" * 32
    opts = {"publicKey": authentication_options(rp_id=rp, challenge=challenge, allow=[],
                                                timeout_ms=1000)}
    assertion = parse_assertion(device.get(opts))
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        verify_assertion(assertion, challenge=challenge, rp_id=rp, origins=[origin],
                         public_key=reg.public_key, stored_sign_count=0,
                         user_handle=None, backup_eligible=None)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _passkey_rows(label: str, decider: Services, waiter: Services, agent: Principal,
                  approver: Principal, key_samples: list[float], raw: float) -> None:
    person, device, sid = _person(decider, agent)
    samples = approve_to_wake(f"{label}, passkey-signed", decider, waiter, agent, approver, sid,
                              200, passkey=(person, device))
    k50 = sorted(key_samples)[len(key_samples) // 2]
    p50 = sorted(samples)[len(samples) // 2]
    print(f"  passkey vs key approval (p50): +{(p50 - k50) * 1e3:.2f} ms; raw assertion check "
          f"{raw * 1e3:.3f} ms = {raw / p50:.0%} of the passkey path")


def bench_wake() -> None:
    print("== approve-to-wake latency")
    with tempfile.TemporaryDirectory() as tmp:
        services, agent, approver, sid = _setup(f"sqlite:///{tmp}/bench.db", Path(tmp))
        raw = assertion_check_alone()
        print(f"  raw primitive: verify_assertion (ES256) alone, p50 {raw * 1e3:.3f} ms")
        try:
            keyed = approve_to_wake("SQLite, same process, API key", services, services, agent,
                                    approver, sid, 200)
            _passkey_rows("SQLite, same process", services, services, agent, approver, keyed,
                          raw)
        finally:
            services.close()
    pg_bin = Path("/usr/lib/postgresql/15/bin/initdb")
    if not pg_bin.exists():
        print("  PostgreSQL not installed: cross-worker case skipped")
        return
    from tests.support.pgcluster import PgCluster

    # fsync on, as a production server runs (the test suite's clusters run without it).
    cluster = PgCluster(fsync=True)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            services, agent, approver, sid = _setup(cluster.url("postgres"), Path(tmp))
            other = Services(services.settings, db=Database(cluster.url("postgres")))
            try:
                other.policy._ensure_listener()
                keyed = approve_to_wake("PostgreSQL, across workers (NOTIFY), API key",
                                        services, other, agent, approver, sid, 200)
                _passkey_rows("PostgreSQL, across workers (NOTIFY)", services, other, agent,
                              approver, keyed, raw)
            finally:
                other.close()
                services.close()
    finally:
        cluster.stop()


def main() -> None:
    # Decision logs go to stdout at info level; a benchmark measures the work, not the terminal.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if "--wake-only" not in sys.argv:
        bench_decisions()
    if "--decisions-only" not in sys.argv:
        bench_wake()


if __name__ == "__main__":
    main()
