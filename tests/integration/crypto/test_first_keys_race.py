"""A tenant's first keys made by several callers at the same moment (SQLite and PostgreSQL).

Each racer is its own :class:`Services` with its own database engine and key caches, as a
worker process of the server is; they share the database and the tenant key directory.
Every caller must get its normal answer, and the tenant must end with one keyring, one KEK
version 1 wrapped by its one tenant key, and one ``key.create`` audit entry.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest
from sqlmodel import Session, select

from sandboxsec.audit.events import AuditEvent
from sandboxsec.audit.models import AuditEntryRow
from sandboxsec.crypto.digests import params_hmac
from sandboxsec.crypto.errors import TenantKeysShreddedError
from sandboxsec.crypto.models import KeyEncryptionKey, TenantKeyring
from sandboxsec.errors import NotFoundError
from sandboxsec.principal import Role
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import SMALL, principal
from tests.support.keyrace import first_digest

RACERS = 6
PROCESSES = 3
PARAMS_HASH = "ab" * 32


@pytest.fixture
def racers(services: Services, settings: Settings, db_url: str) -> Iterator[list[Services]]:
    """``RACERS`` independent service stacks on the test's database."""
    with ExitStack() as stack:
        out = []
        for _ in range(RACERS):
            svc = Services(settings.model_copy(update=SMALL), clock=services.clock,
                           db=Database(db_url, timeout_seconds=20))
            stack.callback(svc.close)
            out.append(svc)
        yield out


def _at_once(racers: list[Services], action: Callable[[int, Services], object]) -> list[object]:
    """Run ``action`` on every racer so that all of them find the tenant without keys before
    any goes on to make them: each racer's first keyring lookup that finds none waits at a
    barrier (no timing: the race is forced, not hoped for).  Only for lookups that hold no
    lock (a locking lookup that waited here would keep the others from reaching it)."""
    start, found_none = threading.Barrier(len(racers)), threading.Barrier(len(racers))
    for svc in racers:
        hierarchy = svc.key_hierarchy
        lookup = hierarchy.keyring
        waited = threading.Event()

        def keyring(s: Session, tenant_id: str, *, for_update: bool = False,
                    _lookup: Callable[..., TenantKeyring] = lookup,
                    _waited: threading.Event = waited) -> TenantKeyring:
            try:
                return _lookup(s, tenant_id, for_update=for_update)
            except NotFoundError:
                if not _waited.is_set():
                    _waited.set()
                    found_none.wait()
                raise

        hierarchy.keyring = keyring  # type: ignore[method-assign]

    def run(i: int) -> object:
        start.wait()
        return action(i, racers[i])

    with ThreadPoolExecutor(len(racers)) as pool:
        return list(pool.map(run, range(len(racers))))


def _key_state(services: Services, tenant_id: str) -> tuple[int, list[int], int]:
    with services.db.session() as s:
        rings = s.exec(select(TenantKeyring).where(TenantKeyring.tenant_id == tenant_id)).all()
        keks = s.exec(
            select(KeyEncryptionKey.version).where(KeyEncryptionKey.tenant_id == tenant_id)
        ).all()
        creates = s.exec(
            select(AuditEntryRow).where(AuditEntryRow.tenant_id == tenant_id,
                                        AuditEntryRow.event == AuditEvent.KEY_CREATE.value)
        ).all()
    return len(rings), sorted(keks), len(creates)


def test_first_keys_made_at_once_in_callers_transactions(
    services: Services, racers: list[Services], tenant: TenantKeys,
    make_session: Callable[[str], str],
) -> None:
    """Half the racers key a params digest inside their own transaction (as policy decisions
    and grants do), half write a trajectory record (a write lease in its own transaction)."""
    assert _key_state(services, tenant.id) == (0, [], 0)
    sessions = [make_session(tenant.id) for _ in racers]
    agent = principal(tenant, Role.AGENT)

    def first_action(i: int, svc: Services) -> object:
        if i % 2:
            return svc.trajectory.write(agent, sessions[i], "action", b"first %d" % i)
        with svc.db.session() as s:
            return svc.key_hierarchy.params_hmac_in(s, tenant.id, PARAMS_HASH)

    answers = _at_once(racers, first_action)

    assert _key_state(services, tenant.id) == (1, [1], 1)
    assert services.key_hierarchy.tenant_keys.count() == 1
    assert services.key_hierarchy.tenant_keys.exists(tenant.id)
    # Every racer keyed with the committed KEK version 1: one digest, the one a fresh reader
    # derives from the stored keys.
    digests = {a for a in answers if isinstance(a, str)}
    expected = params_hmac(services.key_hierarchy.digest_key(tenant.id), PARAMS_HASH)
    assert digests == {expected}
    # Every record written by a racer opens with the stored keys.
    admin = principal(tenant, Role.ADMIN)
    for i, answer in enumerate(answers):
        if i % 2:
            got = services.trajectory.read(admin, sessions[i], answer.record_id)  # type: ignore[attr-defined]
            assert got.data == b"first %d" % i


def test_first_lease_made_at_once(services: Services, racers: list[Services],
                                  tenant: TenantKeys,
                                  make_session: Callable[[str], str]) -> None:
    """Every racer's first action is a trajectory record: all of them are written and read."""
    sessions = [make_session(tenant.id) for _ in racers]
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    written = _at_once(
        racers, lambda i, svc: svc.trajectory.write(agent, sessions[i], "action", b"r%d" % i)
    )
    assert _key_state(services, tenant.id) == (1, [1], 1)
    assert services.key_hierarchy.tenant_keys.count() == 1
    for i, w in enumerate(written):
        assert services.trajectory.read(admin, sessions[i], w.record_id).data == b"r%d" % i  # type: ignore[attr-defined]


def test_concurrent_rotations_each_make_one_version(
    services: Services, racers: list[Services], tenant: TenantKeys,
    make_session: Callable[[str], str],
) -> None:
    """Rotations at the same moment (the first of them also making the tenant's first keys)
    queue on the keyring: each makes the next version, none fails."""
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    start = threading.Barrier(len(racers))

    def rotate(svc: Services) -> None:
        start.wait()
        svc.key_admin.rotate(tenant.id, admin)

    with ThreadPoolExecutor(len(racers)) as pool:
        list(pool.map(rotate, racers))
    rings, versions, creates = _key_state(services, tenant.id)
    assert (rings, versions, creates) == (1, list(range(1, RACERS + 2)), 1)
    assert services.key_admin.status(tenant.id).current_version == RACERS + 1
    sid = make_session(tenant.id)
    w = services.trajectory.write(agent, sid, "action", b"after")
    assert services.trajectory.read(admin, sid, w.record_id).data == b"after"


def test_shredding_while_first_keys_are_made(
    services: Services, racers: list[Services], tenant: TenantKeys,
    make_session: Callable[[str], str],
) -> None:
    """Crypto-shredding at the same moment as the tenant's first writes: each writer either
    writes or is refused ``tenant_keys_shredded``, never an error of the database, and no key
    survives the shredding."""
    sessions = [make_session(tenant.id) for _ in racers]
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    start = threading.Barrier(len(racers))

    def act(i: int) -> str:
        start.wait()
        if i == 0:
            racers[i].key_admin.shred_tenant(tenant.id, admin)
            return "shredded"
        try:
            racers[i].trajectory.write(agent, sessions[i], "action", b"r")
        except TenantKeysShreddedError:
            return "refused"
        return "written"

    with ThreadPoolExecutor(len(racers)) as pool:
        outcomes = list(pool.map(act, range(len(racers))))
    assert outcomes[0] == "shredded"
    assert set(outcomes[1:]) <= {"refused", "written"}
    with services.db.session() as s:
        ring = s.get(TenantKeyring, tenant.id)
        keks = s.exec(select(KeyEncryptionKey).where(KeyEncryptionKey.tenant_id == tenant.id))
        assert ring is not None and ring.shredded_at is not None
        assert keks.all() == []
    assert not services.key_hierarchy.tenant_keys.exists(tenant.id)


def test_a_writer_that_read_the_kek_before_the_shredding_is_told_shredded(
    services: Services, racers: list[Services], tenant: TenantKeys,
    make_session: Callable[[str], str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The race above, forced: a writer reads the KEK row, then the shredding commits and
    destroys the tenant key before the writer unwraps the KEK with it.  The writer must be
    told ``tenant_keys_shredded`` (as when it comes a moment later), not
    ``tenant_key_missing``, which means a key lost without any shredding."""
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    services.trajectory.write(agent, make_session(tenant.id), "action", b"first")
    writer = racers[0]  # its caches have never held this tenant's KEK
    keys = writer.key_hierarchy.tenant_keys
    unwrap = keys.unwrap

    def shredded_first(tenant_id: str, wrapped: bytes, aad: bytes) -> bytes:
        services.key_admin.shred_tenant(tenant.id, admin)
        return unwrap(tenant_id, wrapped, aad)

    monkeypatch.setattr(keys, "unwrap", shredded_first)
    with pytest.raises(TenantKeysShreddedError):
        writer.trajectory.write(agent, make_session(tenant.id), "action", b"second")
    assert not keys.exists(tenant.id)


def test_worker_processes_make_first_keys_at_once(
    services: Services, settings: Settings, db_url: str, tenant: TenantKeys,
) -> None:
    """Separate processes (as a server's workers are), each keying a digest in its own
    transaction at the same moment: one set of keys, one digest, no error."""
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=first_digest, args=(str(settings.home), db_url, tenant.id,
                                                     PARAMS_HASH, barrier, out))
             for _ in range(PROCESSES)]
    for p in procs:
        p.start()
    # A process that dies before reporting fails the test at the timeout, not by hanging it.
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, err in results if err] == []
    assert _key_state(services, tenant.id) == (1, [1], 1)
    assert services.key_hierarchy.tenant_keys.count() == 1
    expected = params_hmac(services.key_hierarchy.digest_key(tenant.id), PARAMS_HASH)
    assert {digest for digest, _ in results} == {expected}
