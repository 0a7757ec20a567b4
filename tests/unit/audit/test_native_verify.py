"""The native bulk hasher computes exactly what the pure-Python verifier computes.

``sandboxsec.audit._native.leaves`` against ``verify._chunk`` over arbitrary line sets (valid
chains and every way a head can be wrong), ``_native.roots`` against ``perfect_root`` and
``MerkleTree``, its bounds checks, and the fallback when the extension is absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sandboxsec.audit
from sandboxsec.audit import verify
from sandboxsec.audit.entry import GENESIS_PREV, entry_prefix
from sandboxsec.audit.errors import AuditVerificationError
from sandboxsec.audit.merkle import MerkleTree, perfect_root
from tests.support.native import require_built
from tests.unit.audit.synth import SynthLog

native: ModuleType | None
try:
    from sandboxsec.audit import _native as native
except ImportError:
    native = None

needs_native = pytest.mark.skipif(native is None, reason="the native hasher is not built")


def test_native_build() -> None:
    """The extension must be built in this environment unless the build was turned off on
    purpose: a silent fallback to the (slower) Python pass would otherwise go unnoticed."""
    require_built(native, "sandboxsec.audit._native", verify.implementation())


# -- leaves: differential against the pure-Python pass ---------------------------------------

_LOG_IDS = st.sampled_from(["tn_test", "tn_%d%%s", "tn_é", 'tn_"q"', ""])
_EDITS = st.sampled_from([
    "none", "none", "none", "seq+1", "seq-1", "prev", "prev-upper", "truncate", "empty",
    "cr", "nonascii", "long", "other-log", "no-prev-field",
])


def _line(prefix: bytes, seq: int, prev: bytes, body: bytes, edit: str, cut: int) -> bytes:
    """One entry line, genuine or broken in the way ``edit`` names."""
    if edit == "seq+1":
        seq += 1
    elif edit == "seq-1":
        seq = max(0, seq - 1) if seq else seq + 2
    elif edit == "prev":
        prev = hashlib.sha256(prev).hexdigest().encode()
    elif edit == "prev-upper":
        prev = prev.upper()
    head = prefix + str(seq).encode() + b',"prev":"' + prev
    if edit == "other-log":
        head = entry_prefix("tn_other") + str(seq).encode() + b',"prev":"' + prev
    elif edit == "no-prev-field":
        head = prefix + str(seq).encode() + b',"prv":"' + prev
    line = head + b'","body":' + body + b"}"
    if edit == "truncate":
        return line[: cut % (len(head) + 1)]
    if edit == "empty":
        return b""
    if edit == "cr":
        return line + b"\r"
    if edit == "nonascii":
        return line.replace(b'"body":', "\"body\":\"\u00e9\u2014\U0001f600\",".encode())
    if edit == "long":
        return line + b" " * 70_000
    return line


@st.composite
def _exports(draw: st.DrawFn) -> tuple[bytes, int, int, bytes, int, bytes]:
    """``(data, lo, hi, prefix, seq, prev)``: lines of a chain, some broken, inside junk."""
    prefix = entry_prefix(draw(_LOG_IDS))
    seq = draw(st.sampled_from([0, 1, 9, 99, 998, 10**6 - 2, 2**40, 2**62]))
    first = draw(st.sampled_from([GENESIS_PREV.encode(), b"ab" * 32, b"", b"\xc3\xa9" * 32]))
    lines = []
    prev = first
    for i in range(draw(st.integers(min_value=1, max_value=12))):
        edit = draw(_EDITS)
        body = draw(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"n")))
        line = _line(prefix, seq + i, prev, body, edit, draw(st.integers(0, 200)))
        lines.append(line)
        prev = hashlib.sha256(b"\x00" + line).hexdigest().encode()
    before = draw(st.binary(max_size=30))
    after = draw(st.binary(max_size=30))
    body = b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")
    data = before + body + after
    lo = len(before)
    # The range ends at the entries (with or without the final newline) or runs into junk.
    hi = draw(st.sampled_from([lo + len(body), max(lo, lo + len(body) - 1), len(data)]))
    return data, lo, hi, prefix, seq, first


@needs_native
@settings(max_examples=400, deadline=None)
@given(_exports())
def test_native_leaves_equal_the_python_pass(case: tuple[bytes, int, int, bytes, int, bytes]
                                             ) -> None:
    data, lo, hi, prefix, seq, prev = case
    assert native is not None
    blob, ok = native.leaves(data, lo, hi, prefix, seq, prev)
    leaves, want_ok = verify._chunk(data, lo, hi, prefix, seq, prev)
    assert blob == b"".join(leaves)
    assert ok is want_ok


@needs_native
def test_native_leaves_hold_for_a_genuine_chain_and_fail_for_a_broken_one() -> None:
    # The differential test could pass with both sides always wrong: anchor it to the service.
    log = SynthLog(30, every=10)
    data = b"\n".join(log.lines) + b"\n"
    assert native is not None
    prefix, first = entry_prefix("tn_test"), GENESIS_PREV.encode()
    blob, ok = native.leaves(data, 0, len(data) - 1, prefix, 0, first)
    assert ok and blob == b"".join(log.leaves)
    edited = data.replace(b'"seq":17,', b'"seq":18,', 1)
    assert native.leaves(edited, 0, len(edited) - 1, prefix, 0, first)[1] is False
    assert native.leaves(data, 0, len(data) - 1, prefix, 1, first)[1] is False
    assert native.leaves(data, 0, len(data) - 1, prefix, 0, b"1" * 64)[1] is False
    # A range starting at the sixth line, with that line's seq and predecessor.
    at = sum(len(x) + 1 for x in log.lines[:5])
    blob, ok = native.leaves(data, at, len(data) - 1, prefix, 5, log.leaves[4].hex().encode())
    assert ok and blob == b"".join(log.leaves[5:])


@needs_native
@pytest.mark.parametrize(("lo", "hi"), [(-1, 3), (2, 1), (0, 11), (11, 11)])
def test_native_leaves_refuse_a_range_outside_the_data(lo: int, hi: int) -> None:
    assert native is not None
    with pytest.raises(ValueError, match="range"):
        native.leaves(b"0123456789", lo, hi, b"{", 0, b"")


@needs_native
@pytest.mark.parametrize("seq", [-1, 2**64, 2**64 - 1])
def test_native_leaves_refuse_sequence_numbers_beyond_64_bits(seq: int) -> None:
    assert native is not None
    # 2**64 - 1 fits, but the second line's number would wrap around to 0.
    with pytest.raises(OverflowError):
        native.leaves(b"a\nb", 0, 3, b"{", seq, b"")


@needs_native
def test_native_leaves_accept_the_last_sequence_number() -> None:
    assert native is not None
    blob, ok = native.leaves(b"a", 0, 1, b"a", 2**64 - 1, b"")
    assert blob == hashlib.sha256(b"\x00a").digest() and ok is False


@needs_native
def test_native_leaves_refuse_a_buffer_another_thread_could_change() -> None:
    assert native is not None
    with pytest.raises(TypeError, match="read-only"):
        native.leaves(bytearray(b"a\nb"), 0, 3, b"{", 0, b"")
    # A read-only view of bytes is fine, and so is an empty range (one empty line).
    assert native.leaves(memoryview(b"xy"), 1, 1, b"", 0, b"") == (
        hashlib.sha256(b"\x00").digest(), False)


@needs_native
def test_verify_export_hands_only_bytes_to_the_native_pass() -> None:
    log = SynthLog(12, every=4)
    data = log.export()
    assert verify.verify_export(data, log.key.public_key()).entries == 12
    # A bytearray (mutable: not read without the GIL) is verified by the Python pass.
    assert verify.verify_export(bytearray(data), log.key.public_key()).entries == 12  # type: ignore[arg-type]


# -- roots: against perfect_root and MerkleTree ----------------------------------------------


@needs_native
@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=5),
       st.binary(min_size=32, max_size=32))
def test_native_roots_equal_perfect_root(height: int, blocks: int, seed: bytes) -> None:
    width = 1 << height
    leaves = [hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(blocks * width)]
    assert native is not None
    out = native.roots(b"".join(leaves), height)
    assert out == b"".join(perfect_root(leaves[b * width : (b + 1) * width])
                           for b in range(blocks))
    if blocks == 1:
        assert out == MerkleTree(leaves).root()


@needs_native
def test_native_roots_of_a_view_of_the_middle() -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(24)]
    view = memoryview(b"".join(leaves))[8 * 32 : 24 * 32]
    assert native is not None
    assert native.roots(view, 3) == perfect_root(leaves[8:16]) + perfect_root(leaves[16:24])


@needs_native
@pytest.mark.parametrize(("nbytes", "height"), [(31, 0), (33, 0), (96, 1), (64, -1), (64, 41)])
def test_native_roots_refuse_partial_blocks_and_bad_heights(nbytes: int, height: int) -> None:
    assert native is not None
    with pytest.raises(ValueError):
        native.roots(b"\x00" * nbytes, height)


# -- the fallback -----------------------------------------------------------------------------


def _verify_module_without_native(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of the verify module imported while the extension cannot be imported."""
    monkeypatch.setitem(sys.modules, "sandboxsec.audit._native", None)  # import -> ImportError
    monkeypatch.delattr(sandboxsec.audit, "_native", raising=False)  # as if never imported
    spec = importlib.util.spec_from_file_location("verify_without_native", verify.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_without_the_extension_the_python_pass_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = _verify_module_without_native(monkeypatch)
    assert fallback.implementation() == "python"
    log = SynthLog(40, every=8)
    pub = log.key.public_key()
    assert fallback.verify_export(log.export(), pub).entries == 40
    # Every kind of edit gets the same verdict, reason code and entry from both passes.
    cases = []
    for k in (0, 13, 39):
        lines = list(log.lines)
        lines[k] = lines[k].replace(b'"action":"payment"', b'"action":"refund"')
        cases.append(lines)
        cases.append(log.lines[:k] + log.lines[k + 1 :])
        cases.append([*log.lines[:k], log.lines[k].replace(b'"seq":', b'"seq":1', 1),
                      *log.lines[k + 1 :]])
    for lines in cases:
        data = log.export(lines=lines)
        verdicts = []
        for module in (fallback, verify):
            with pytest.raises(AuditVerificationError) as exc:
                module.verify_export(data, pub)
            verdicts.append((type(exc.value), exc.value.reason, exc.value.seq, str(exc.value)))
        assert verdicts[0] == verdicts[1]
