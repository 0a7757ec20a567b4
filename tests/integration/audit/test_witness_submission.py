"""How checkpoints reach the witnesses and their cosignatures reach the log: proofs from the
leaves just committed, connections kept alive, cosignatures stored in the group commit.

Two witness processes, SQLite and PostgreSQL.  Every path is checked against what the stored
tree and a restarted service would give, and against witnesses that go away, answer garbage
or sit behind a proxy.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from sandboxsec.audit.checkpoint import Checkpoint, sign_checkpoint, verifier_key
from sandboxsec.audit.cosignature import (
    Cosignature,
    WitnessKey,
    parse_witness_key,
    verify_cosignatures,
)
from sandboxsec.audit.cosignature_store import insert_cosignatures
from sandboxsec.audit.errors import (
    AuditHistoryMismatchError,
    AuditLogAlarmedError,
    AuditUnavailableError,
)
from sandboxsec.audit.merkle import MerkleTree
from sandboxsec.audit.reader import StoredTree
from sandboxsec.audit.record import AuditReceipt
from sandboxsec.audit.verify import verify_export
from sandboxsec.audit.witness_client import WitnessEndpoint, WitnessPublisher
from sandboxsec.clock import FixedClock
from sandboxsec.services import Services
from sandboxsec.storage.db import Database
from tests.integration.audit.conftest import CHECKPOINT_EVERY, decision, truncate_log
from tests.integration.audit.witnesses import (
    WitnessProcess,
    start_witness,
    stop_witness,
    witnesses,
)

LOG = "tn_submitted"


def test_witness_proofs_from_memory_equal_the_stored_tree_and_are_used(
    witnessed: tuple[Services, list[WitnessProcess]],
) -> None:
    svc, ws = witnessed
    guard = svc.audit.writer.guard
    assert guard.recent is not None
    # Group commits of uneven sizes: checkpoints fall inside and at the end of transactions.
    sizes = [3, 8, 13, 1, 16, 5, 21]
    for i, n in enumerate(sizes):
        svc.audit.append_many([decision(LOG, 100 * i + j) for j in range(n)])
    end = sum(sizes)
    answered = 0
    for old in range(1, end + 1):
        got = guard.recent.consistency_proof(LOG, old, end)
        if got is not None:
            answered += 1
            assert got == StoredTree(svc.db, LOG, end).consistency_proof(old, end), old
    assert answered >= len(sizes) - 1
    # Both witnesses cosigned the newest checkpoint, whose proof came from memory.
    data = b"".join(svc.audit.export(LOG))
    report = verify_export(data, svc.audit.keys.public_key, min_witnesses=2,
                           witnesses=[parse_witness_key(w.vkey) for w in ws])
    assert report.tree_size == end


def test_a_cosignature_lost_before_its_commit_is_given_again(
    witnessed: tuple[Services, list[WitnessProcess]], database: Database, clock: FixedClock,
) -> None:
    """A crash between a witness's answer and the commit that stores its cosignature: the
    witness has moved on, the log has no cosignature.  A restarted service gets it again,
    and the witness still refuses anything that does not extend what it cosigned."""
    svc, ws = witnessed
    svc.audit.append_many([decision(LOG, i) for i in range(2 * CHECKPOINT_EVERY)])
    b"".join(svc.audit.export(LOG))  # waits for the witnesses
    newest = svc.audit.latest_checkpoint(LOG)
    assert newest is not None and len(svc.audit.cosignatures(LOG, newest.size)[newest.size]) == 2
    settings = svc.settings
    svc.close()
    with database.engine.begin() as conn:  # what the commit that never happened would hold
        conn.execute(text("DELETE FROM audit_cosignatures WHERE tenant_id = :t"), {"t": LOG})
    again = Services(settings, clock=clock, db=database)
    try:
        data = b"".join(again.audit.export(LOG))
        report = verify_export(data, again.audit.keys.public_key, min_witnesses=2,
                               witnesses=[parse_witness_key(w.vkey) for w in ws])
        assert report.tree_size == newest.size
        assert sorted(c.witness for c in report.cosignatures) == sorted(w.name for w in ws)
        # The log grows on: cosigned from the size the witnesses hold.
        again.audit.append_many([decision(LOG, 100 + i) for i in range(CHECKPOINT_EVERY)])
        data = b"".join(again.audit.export(LOG))
        report = verify_export(data, again.audit.keys.public_key, min_witnesses=2,
                               witnesses=[parse_witness_key(w.vkey) for w in ws])
        assert report.tree_size == newest.size + CHECKPOINT_EVERY
    finally:
        again.close()


# ------------------------------------------------------------------ the HTTP connections


@pytest.fixture
def log_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _vkey(key: Ed25519PrivateKey) -> str:
    return verifier_key("sandboxsec.test/audit", key.public_key())


def _checkpoint(key: Ed25519PrivateKey, tree: MerkleTree, size: int) -> tuple[str, Checkpoint]:
    cp = Checkpoint("sandboxsec.test/audit/tn_a", size, tree.root(size))
    return sign_checkpoint(cp, name="sandboxsec.test/audit", private_key=key).note, cp


def _publisher(
    endpoints: list[WitnessEndpoint], tree: MerkleTree, refused: list[str]
) -> WitnessPublisher:
    return WitnessPublisher(
        endpoints, timeout=10.0,
        proof=lambda _log, old, new: tree.consistency_proof(old, new),
        on_cosigned=lambda *_: None,
        on_refused=lambda _log, _w, msg: refused.append(msg),
        newest=lambda _log: tree.size,
    )


@pytest.fixture
def one_witness(tmp_path: Path, log_key: Ed25519PrivateKey) -> Iterator[WitnessProcess]:
    with witnesses(tmp_path, _vkey(log_key), n=1) as ws:
        yield ws[0]


def test_a_witness_restarted_between_submissions_still_cosigns(
    tmp_path: Path, log_key: Ed25519PrivateKey, one_witness: WitnessProcess
) -> None:
    tree = MerkleTree([bytes([i]) * 32 for i in range(40)])
    w = one_witness
    ep = WitnessEndpoint(w.url, parse_witness_key(w.vkey))
    refused: list[str] = []
    pub = _publisher([ep], tree, refused)
    try:
        note, cp = _checkpoint(log_key, tree, 10)
        assert len(pub.submit("tn_a", note, cp)) == 1
        # The kept-alive connection dies with the process; the restarted witness (same home,
        # same port) is reached on a new one and cosigns from the size it kept.
        port = int(w.url.rsplit(":", 1)[1].split("/", 1)[0])
        stop_witness(w)
        w2 = start_witness(w.home, w.name, _vkey(log_key), port=port)
        try:
            note, cp = _checkpoint(log_key, tree, 30)
            got = pub.submit("tn_a", note, cp)
            assert len(got) == 1 and verify_cosignatures(cp, [got[0].line], [ep.key])
            # A rollback is still refused by the witness, and alarms the log.
            note, cp = _checkpoint(log_key, MerkleTree([b"\x07" * 32] * 40), 35)
            assert pub.submit("tn_a", note, cp) == []
            assert refused and "refused size 35 with 422" in refused[0]
        finally:
            stop_witness(w2)
        # Gone: no cosignature, no alarm.
        note, cp = _checkpoint(log_key, tree, 40)
        assert pub.submit("tn_a", note, cp) == []
        assert len(refused) == 1
    finally:
        pub.close()


class _Garbage(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    answers: list[tuple[int, str, bytes]] = []
    authorization: list[str | None] = []

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.authorization.append(self.headers.get("Authorization"))
        status, ctype, body = self.answers.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_answers_that_are_not_cosignatures_give_none(log_key: Ed25519PrivateKey) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    tree = MerkleTree([bytes([i]) * 32 for i in range(8)])
    key = WitnessKey.from_private("w.example/w", Ed25519PrivateKey.generate())
    note, cp = _checkpoint(log_key, tree, 8)
    refused: list[str] = []
    try:
        pub = _publisher([WitnessEndpoint(f"http://127.0.0.1:{port}/add-checkpoint", key)],
                         tree, refused)
        try:
            _Garbage.answers[:] = [
                (200, "text/plain", b"\xe2\x80\x94 w.example/w " + b"A" * 100_000 + b"\n"),
                (200, "text/plain", b"\xe2\x80\x94 w.example/w AAAA\n"),
                (409, "text/plain", b"not a size\n"),
            ]
            assert pub.submit("tn_a", note, cp) == []  # too large to be one
            assert pub.submit("tn_a", note, cp) == []  # not signed by the witness's key
            assert refused == []
            assert pub.submit("tn_a", note, cp) == []  # 409 that is not a size: another past
            assert len(refused) == 1 and "409" in refused[0]
        finally:
            pub.close()
        # Credentials in a witness URL are sent, as they always were (Basic auth).
        pub = _publisher([WitnessEndpoint(f"http://u:p@127.0.0.1:{port}/add-checkpoint", key)],
                         tree, refused)
        try:
            _Garbage.answers[:] = [(404, "text/plain", b"no\n")]
            _Garbage.authorization.clear()
            assert pub.submit("tn_a", note, cp) == []
            assert _Garbage.authorization == ["Basic dTpw"]
        finally:
            pub.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_configured_proxy_is_used_for_witness_requests(
    log_key: Ed25519PrivateKey, one_witness: WitnessProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens at the proxy: a request that honours it cannot reach the witness.
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    tree = MerkleTree([bytes([i]) * 32 for i in range(8)])
    ep = WitnessEndpoint(one_witness.url, parse_witness_key(one_witness.vkey))
    refused: list[str] = []
    pub = _publisher([ep], tree, refused)
    try:
        note, cp = _checkpoint(log_key, tree, 8)
        assert pub.submit("tn_a", note, cp) == []
    finally:
        pub.close()
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.delenv("http_proxy")
    pub = _publisher([ep], tree, refused)
    try:
        assert len(pub.submit("tn_a", note, cp)) == 1
    finally:
        pub.close()
    assert refused == []


# ------------------------------------------------------- cosignatures in the group commit


def _cosig(witness: str, size: int) -> Cosignature:
    return Cosignature(witness=witness, key_id=b"\0" * 4, timestamp=0, size=size,
                       root_hash=b"\0" * 32, line=f"\u2014 {witness} AAAA{size}\n")


def test_work_rides_in_a_group_commit_and_a_failing_one_denies_no_append(
    audit_services: Services,
) -> None:
    svc = audit_services
    writer = svc.audit.writer
    svc.audit.append(decision(LOG, 0))  # the writer thread runs
    inside, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> None:
        # Occupies the writer inside a transaction so what follows queues into one batch.
        insert_cosignatures(conn, svc.clock.now(), LOG, 1, [_cosig("held.example/w", 1)])
        inside.set()
        release.wait(10)

    def failing(conn: Connection) -> None:
        insert_cosignatures(conn, svc.clock.now(), LOG, 2, [_cosig("bad.example/w", 2)])
        raise ValueError("a broken work item")

    results: dict[str, object] = {}
    run = _recorder(results)

    group = writer._group
    first = threading.Thread(target=run, args=("held", lambda: group.submit([], 10, work=hold)))
    first.start()
    assert inside.wait(10)
    others = [
        threading.Thread(target=run, args=("append", lambda: svc.audit.append(decision(LOG, 1)))),
        threading.Thread(target=run, args=("bad", lambda: group.submit([], 10, work=failing))),
        threading.Thread(target=run, args=("cosig", lambda: writer.store_cosignatures(
            LOG, 3, [_cosig("good.example/w", 3)]))),
    ]
    for t in others:
        t.start()
    time.sleep(0.3)  # all three queued behind the held transaction
    release.set()
    for t in [first, *others]:
        t.join(15)
    assert results["held"] == []
    assert isinstance(results["bad"], AuditUnavailableError)
    assert results["cosig"] is None
    receipt = results["append"]
    assert isinstance(receipt, AuditReceipt) and receipt.seq == 1
    stored = svc.audit.cosignatures(LOG)
    # The failing item's own write was rolled back with it; the others committed.
    assert stored == {1: [_cosig("held.example/w", 1).line], 3: [_cosig("good.example/w", 3).line]}
    assert svc.audit.size(LOG) == 2


def test_a_write_that_stops_its_log_in_a_shared_commit_learns_why(
    audit_services: Services,
) -> None:
    """A write whose log turns out truncated by a database administrator stops that log.  When
    it shares its group commit with other work (a cosignature, another log's entry), the
    batch fails, and each caller is retried alone: the writer of the stopped log gets the
    mismatch with its own reason code (not the later "log stopped"), and nobody else is
    denied."""
    svc = audit_services
    writer = svc.audit.writer
    group = writer._group
    svc.audit.append_many([decision(LOG, i) for i in range(12)])
    svc.audit.checkpoint_now(LOG)
    truncate_log(svc, LOG, 10)
    inside, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> None:
        inside.set()
        release.wait(10)

    results: dict[str, object] = {}
    run = _recorder(results)
    first = threading.Thread(target=run, args=("held", lambda: group.submit([], 10, work=hold)))
    first.start()
    assert inside.wait(10)
    others = [
        threading.Thread(target=run, args=("truncated", lambda: svc.audit.append_many(
            [decision(LOG, 50 + i) for i in range(CHECKPOINT_EVERY)]))),
        threading.Thread(target=run, args=("other", lambda: svc.audit.append(
            decision("tn_other", 0)))),
        threading.Thread(target=run, args=("cosig", lambda: writer.store_cosignatures(
            "tn_other", 1, [_cosig("good.example/w", 1)]))),
    ]
    for t in others:
        t.start()
    time.sleep(0.3)  # all three queued behind the held transaction: one batch
    release.set()
    for t in [first, *others]:
        t.join(15)
    assert isinstance(results["truncated"], AuditHistoryMismatchError)
    assert results["truncated"].code == "audit_history_mismatch"
    alarm = svc.audit.guard.states.alarm(LOG)
    assert alarm is not None and alarm.code == "audit_history_mismatch"
    assert svc.audit.size(LOG) == 10
    # The other log's writers were not denied.
    receipt = results["other"]
    assert isinstance(receipt, AuditReceipt) and receipt.seq == 0
    assert results["cosig"] is None
    # Once stopped, a later write of that log is told the log is stopped.
    with pytest.raises(AuditLogAlarmedError):
        svc.audit.append(decision(LOG, 99))


def test_a_failed_transaction_leaves_nothing_for_the_next_commit_to_publish(
    audit_services: Services,
) -> None:
    """A group transaction that signed a checkpoint and then failed as a whole (the database
    went away mid-batch) must not have that checkpoint published by the next commit, even one
    that only stores cosignatures: the state file would then hold a tree the log never had,
    and the next checkpoint would stop the log with a false alarm."""
    svc = audit_services
    writer = svc.audit.writer
    group = writer._group
    svc.audit.append(decision(LOG, 0))
    inside, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> None:
        inside.set()
        release.wait(10)

    def outage(conn: Connection) -> None:
        raise OperationalError("COMMIT", {}, Exception("the database went away"))

    results: dict[str, object] = {}
    run = _recorder(results)

    first = threading.Thread(target=run, args=("held", lambda: group.submit([], 10, work=hold)))
    first.start()
    assert inside.wait(10)
    batch = [decision(LOG, 1 + i) for i in range(CHECKPOINT_EVERY)]  # signs a checkpoint
    others = [
        threading.Thread(target=run, args=("signed", lambda: svc.audit.append_many(batch))),
        threading.Thread(target=run, args=("outage", lambda: group.submit([], 10,
                                                                          work=outage))),
    ]
    for t in others:
        t.start()
    time.sleep(0.3)
    release.set()
    for t in [first, *others]:
        t.join(15)
    assert isinstance(results["signed"], AuditUnavailableError)
    assert isinstance(results["outage"], AuditUnavailableError)
    assert svc.audit.size(LOG) == 1
    # A commit that writes no entry (cosignatures only), then the log goes on.
    writer.store_cosignatures(LOG, 1, [_cosig("w.example/w", 1)])
    state = svc.audit.guard.states.load(LOG)
    assert state is None or state.size <= 1
    svc.audit.append_many([decision(LOG, 100 + i) for i in range(CHECKPOINT_EVERY)])
    assert svc.audit.guard.states.alarm(LOG) is None
    newest = svc.audit.latest_checkpoint(LOG)
    assert newest is not None and newest.size == 1 + CHECKPOINT_EVERY


def _recorder(results: dict[str, object]) -> Callable[[str, Callable[[], object]], None]:
    """``run(name, fn)`` for a thread: keeps what ``fn`` returned, or what it raised."""

    def run(name: str, fn: Callable[[], object]) -> None:
        try:
            results[name] = fn()
        except Exception as exc:
            results[name] = exc

    return run
