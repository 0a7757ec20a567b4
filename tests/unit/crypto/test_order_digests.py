"""The pure cores of authenticated order, keyed digests and the refusal rate limit."""

from __future__ import annotations

import hashlib

import pytest

from sandboxsec.crypto.digests import ContentHasher, content_hmac, derive_digest_key, params_hmac
from sandboxsec.crypto.errors import (
    DecryptionFailedError,
    TrajectoryRecordMissingError,
    TrajectoryRecordReattributedError,
    TrajectoryRecordReorderedError,
)
from sandboxsec.tenants.refusals import RefusalLimiter
from sandboxsec.trajectory.order import SeqRange, check_head, check_range, open_meta, seal_meta


def test_sealed_meta_round_trips_and_names_each_edit() -> None:
    raw = seal_meta({"step": 1}, seq=3, author="k1")
    assert open_meta(raw, seq=3, author="k1") == {"step": 1}
    with pytest.raises(TrajectoryRecordReorderedError):
        open_meta(raw, seq=4, author="k1")
    with pytest.raises(TrajectoryRecordReattributedError):
        open_meta(raw, seq=3, author="k2")
    for bad in (b"{}", b"[]", b"not json", b'{"seq":"3","author":"k1","meta":{}}',
                b'{"seq":3,"author":"k1","meta":[]}'):
        with pytest.raises(DecryptionFailedError):
            open_meta(bad, seq=3, author="k1")


@pytest.mark.parametrize(("found", "error"), [
    (SeqRange(upto=4, rows=5, distinct=5, lowest=0), None),
    (SeqRange(upto=4, rows=4, distinct=4, lowest=0), TrajectoryRecordMissingError),
    (SeqRange(upto=4, rows=4, distinct=4, lowest=1), TrajectoryRecordMissingError),
    (SeqRange(upto=4, rows=5, distinct=4, lowest=0), TrajectoryRecordReorderedError),
    (SeqRange(upto=2, rows=4, distinct=4, lowest=-1), TrajectoryRecordReorderedError),
])
def test_ranges(found: SeqRange, error: type[Exception] | None) -> None:
    if error is None:
        check_range(found)
    else:
        with pytest.raises(error):
            check_range(found)


def test_head() -> None:
    check_head(3, 3)
    with pytest.raises(TrajectoryRecordMissingError):
        check_head(3, 2)
    with pytest.raises(TrajectoryRecordReorderedError):
        check_head(2, 3)


def test_digests_are_keyed_per_tenant_and_per_kind() -> None:
    kek = bytes(range(32))
    ka, kb = derive_digest_key(kek, "tn_a"), derive_digest_key(kek, "tn_b")
    assert ka != kb and len(ka) == 32
    pin = b"481516"
    assert content_hmac(ka, pin) != content_hmac(kb, pin)
    assert content_hmac(ka, pin) != hashlib.sha256(pin).hexdigest()
    h = ContentHasher(ka)
    h.update(pin[:2])
    h.update(memoryview(pin)[2:])
    assert h.hexdigest() == content_hmac(ka, pin)
    # A content digest can never stand in for a params digest of the same bytes.
    p_hash = hashlib.sha256(b"{}").hexdigest()
    assert params_hmac(ka, p_hash) != content_hmac(ka, p_hash.encode())


def test_refusal_limiter_writes_a_bounded_number_and_reports_the_rest() -> None:
    limiter = RefusalLimiter(per_window=2, window_seconds=10)
    got = [limiter.admit(0.0 + i * 0.1) for i in range(5)]
    assert [a.write for a in got] == [True, True, False, False, False]
    nxt = limiter.admit(10.5)
    assert nxt.write and nxt.suppressed == 3
    assert limiter.admit(10.6).suppressed == 0
    assert not limiter.admit(10.7).write
    limiter.give_back(4)
    assert limiter.admit(21.0).suppressed == 5
