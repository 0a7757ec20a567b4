"""The native proof-signature check answers exactly as ``cryptography`` does.

``sandboxsec.sessions._p256`` against ``EllipticCurvePublicKey.verify`` over genuine
signatures, every way a signature can be wrong (flipped bits, r or s zero, at or above the
group order, the high-s twin, another key, another message), its input bounds and point
checks, its thread pool (many checks at once, a check dropped unanswered, a fork), and the
fallback when the module is absent.
"""

from __future__ import annotations

import os
import re
import threading
from types import ModuleType

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.sessions import dpop, signatures
from tests.support.native import require_built

native: ModuleType | None
try:
    from sandboxsec.sessions import _p256 as native
except ImportError:
    native = None

needs_native = pytest.mark.skipif(native is None, reason="the native signature check is not built")

#: The order of the P-256 group.
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_ECDSA = ec.ECDSA(hashes.SHA256())
_KEYS = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]


def _point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def _raw(r: int, s: int) -> bytes:
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> tuple[int, int]:
    return decode_dss_signature(key.sign(message, _ECDSA))


def _signature(key: ec.EllipticCurvePrivateKey, raw: bytes,
               message: bytes) -> dpop.ProofSignature:
    return dpop.ProofSignature(key=key.public_key(), point=_point(key), raw=raw,
                               message=message, head_b64="h", fresh_header=None)


def _reference(key: ec.EllipticCurvePrivateKey, raw: bytes, message: bytes) -> bool:
    """What the service answers without the module: cryptography on the same DER."""
    return _signature(key, raw, message).verify()


def test_native_build() -> None:
    """Built here unless turned off on purpose: a silent fallback would put the signature
    check back on every action's path unnoticed."""
    require_built(native, "sandboxsec.sessions._p256", signatures.implementation())


_MUTATIONS = st.sampled_from([
    "none", "none", "flip", "r=0", "s=0", "r=n", "s=n", "r=n+1", "s=max", "high-s",
    "r+n", "other-key", "other-message", "swap",
])


def _mutate(r: int, s: int, how: str, bit: int) -> tuple[int, int, int, bool]:
    """(r, s, key index, other message) for the mutation ``how``."""
    key, other = 0, False
    if how == "flip":
        raw = bytearray(_raw(r, s))
        raw[bit // 8 % 64] ^= 1 << (bit % 8)
        return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"), key, other
    if how == "r=0":
        r = 0
    elif how == "s=0":
        s = 0
    elif how == "r=n":
        r = N
    elif how == "s=n":
        s = N
    elif how == "r=n+1":
        r = N + 1
    elif how == "s=max":
        s = 2**256 - 1
    elif how == "high-s":
        s = N - s  # the twin every ECDSA verifier accepts; both must agree
    elif how == "r+n":
        r = r + N if r + N < 2**256 else r
    elif how == "other-key":
        key = 1
    elif how == "other-message":
        other = True
    elif how == "swap":
        r, s = s, r
    return r, s, key, other


@needs_native
@settings(max_examples=300, deadline=None)
@given(message=st.binary(min_size=1, max_size=600), how=_MUTATIONS,
       bit=st.integers(0, 511), signer=st.integers(0, 2))
def test_native_answers_as_cryptography(message: bytes, how: str, bit: int,
                                        signer: int) -> None:
    assert native is not None
    key = _KEYS[signer]
    r, s = _sign(key, message)
    r, s, other_key, other_message = _mutate(r, s, how, bit)
    checked_key = _KEYS[(signer + other_key) % len(_KEYS)]
    checked_message = message + b"!" if other_message else message
    raw = _raw(r, s)
    expected = _reference(checked_key, raw, checked_message)
    public = native.PublicKey(_point(checked_key))
    assert public.verify(raw, checked_message) is expected
    assert public.start(raw, checked_message).result() is expected
    if how == "none":
        assert expected  # the generator makes genuine signatures too


@needs_native
def test_high_s_twin_and_edge_scalars_agree_with_cryptography() -> None:
    assert native is not None
    key = _KEYS[0]
    message = b"proof signing input"
    r, s = _sign(key, message)
    public = native.PublicKey(_point(key))
    for rr, ss in ((r, s), (r, N - s), (0, s), (r, 0), (N, s), (r, N), (N - 1, N - 1),
                   (1, 1), (2**256 - 1, 2**256 - 1)):
        raw = _raw(rr, ss)
        assert public.verify(raw, message) is _reference(key, raw, message), (rr, ss)


@needs_native
def test_inputs_are_bounded() -> None:
    assert native is not None
    public = native.PublicKey(_point(_KEYS[0]))
    for bad in (b"", b"\x00" * 63, b"\x00" * 65, b"\x30" + b"\x00" * 70):
        with pytest.raises(ValueError, match=re.escape("r || s")):
            public.verify(bad, b"m")
        with pytest.raises(ValueError, match=re.escape("r || s")):
            public.start(bad, b"m")
    with pytest.raises(ValueError, match="message"):
        public.verify(b"\x01" * 64, b"")
    with pytest.raises(ValueError, match="message"):
        public.start(b"\x01" * 64, b"x" * 65537)
    with pytest.raises(TypeError):
        public.verify("not bytes", b"m")  # type: ignore[arg-type]


_GOOD_POINT = _point(_KEYS[0])


# Named ids: the keys are random, and every test worker must collect the same names.
@pytest.mark.parametrize("point", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x04" + b"\x00" * 64, id="zero-not-on-curve"),
    pytest.param(b"\x04" + b"\x01" * 64, id="ones-not-on-curve"),
    pytest.param(b"\x02" + b"\x00" * 32, id="compressed"),
    pytest.param(_GOOD_POINT[:64], id="short"),
    pytest.param(_GOOD_POINT + b"\x00", id="long"),
    pytest.param(b"\x05" + _GOOD_POINT[1:], id="wrong-prefix"),
    pytest.param(b"\x04" + (2**256 - 1).to_bytes(32, "big") * 2, id="beyond-the-field"),
])
@needs_native
def test_points_off_the_curve_are_refused(point: bytes) -> None:
    assert native is not None
    with pytest.raises(ValueError, match="P-256"):
        native.PublicKey(point)


@needs_native
def test_many_checks_at_once_from_many_threads() -> None:
    """The pool answers each check with its own answer, whoever started it."""
    assert native is not None
    key = _KEYS[0]
    public = native.PublicKey(_point(key))
    messages = [f"m{i}".encode() for i in range(64)]
    good = {m: _raw(*_sign(key, m)) for m in messages}
    failures: list[str] = []

    def run(offset: int) -> None:
        pending = []
        for i, m in enumerate(messages):
            valid = (i + offset) % 3 != 0
            raw = good[m] if valid else good[messages[(messages.index(m) + 1) % 64]]
            pending.append((valid, public.start(raw, m)))
        for valid, p in pending:
            if p.result() is not valid:
                failures.append(f"offset {offset}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@needs_native
def test_a_check_dropped_unanswered_is_finished_before_it_is_freed() -> None:
    assert native is not None
    key = _KEYS[1]
    public = native.PublicKey(_point(key))
    raw = _raw(*_sign(key, b"m"))
    for _ in range(200):
        public.start(raw, b"m")  # dropped at once: freed only once done
    assert public.start(raw, b"m").result() is True


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_checks_on_its_own() -> None:
    """A check started before a fork is answered in the child (its thread stayed in the
    parent), and the child's own checks run on a pool of its own."""
    assert native is not None
    key = _KEYS[2]
    public = native.PublicKey(_point(key))
    raw = _raw(*_sign(key, b"m"))
    before = public.start(raw, b"m")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        ok = (before.result() is True and public.start(raw, b"m").result() is True
              and public.start(raw, b"other").result() is False)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert before.result() is True


def test_without_the_module_checks_run_with_cryptography(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback: the same answers, checked at once in the caller."""
    monkeypatch.setattr(signatures, "_native", None)
    keys = dpop.KeyCache()
    checks = signatures.SignatureChecks(keys)
    assert not checks.overlaps
    key = _KEYS[0]
    raw = _raw(*_sign(key, b"m"))
    good, bad = _signature(key, raw, b"m"), _signature(key, raw, b"n")
    assert checks.start(good).valid() is True
    assert checks.start(bad).valid() is False


@needs_native
def test_a_key_whose_proof_failed_is_checked_before_acting() -> None:
    """After one forged proof, the key's next proofs are checked in the caller, so a forger
    is not handed a decision (computed, then rolled back) for every forged proof."""
    keys = dpop.KeyCache()
    checks = signatures.SignatureChecks(keys)
    assert checks.overlaps
    key = _KEYS[1]
    raw = _raw(*_sign(key, b"m"))
    good, forged = _signature(key, raw, b"m"), _signature(key, raw, b"forged")
    assert checks.start(good)._running is not None  # on the pool
    assert checks.start(forged).valid() is False
    after = checks.start(good)
    assert after._running is None  # answered in the caller
    assert after.valid() is True
    with pytest.raises(InvalidSignature):  # the reference refuses the forged one too
        key.public_key().verify(dpop._raw_to_der(raw), b"forged", _ECDSA)


@needs_native
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux /proc only")
def test_pool_threads_leave_signals_to_the_interpreter() -> None:
    """A pool thread blocks SIGINT and SIGTERM, so Ctrl-C and a shutdown signal reach the
    interpreter's own threads (not a thread that only runs OpenSSL)."""
    assert native is not None
    key = _KEYS[0]
    public = native.PublicKey(_point(key))
    assert public.start(_raw(*_sign(key, b"m")), b"m").result() is True
    python_threads = {t.native_id for t in threading.enumerate()}
    masks = {}
    for task in os.listdir("/proc/self/task"):
        if int(task) in python_threads:
            continue
        with open(f"/proc/self/task/{task}/status") as status:
            for line in status:
                if line.startswith("SigBlk:"):
                    masks[task] = int(line.split()[1], 16)
    wanted = (1 << (2 - 1)) | (1 << (15 - 1))  # SIGINT, SIGTERM
    pool = [t for t, m in masks.items() if m & wanted == wanted]
    assert pool, f"no thread outside Python blocks SIGINT and SIGTERM: {masks}"
