"""Sealed records: round trips, and every way a stored ciphertext can be tampered with."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.crypto.envelope import (
    HEADER_BYTES,
    OVERHEAD_BYTES,
    DataKey,
    encode_context,
    open_sealed,
    parse_header,
    seal,
    unwrap_secret,
    wrap_secret,
)
from sandboxsec.crypto.errors import DecryptionFailedError

KEY = DataKey.generate()
CTX = encode_context("sandboxsec/trajectory/v1", "tn_a", "ss_1", "tr_1", "data", "action")


def test_round_trip_and_layout() -> None:
    blob = seal(KEY, b"transfer 100 EUR", CTX)
    assert len(blob) == len(b"transfer 100 EUR") + OVERHEAD_BYTES
    assert blob[0] == 0x01 and blob[1] == 0x01
    header = parse_header(blob)
    assert header.dek_id == KEY.dek_id
    assert header.commitment == KEY.commitment
    assert b"transfer" not in blob
    assert open_sealed(KEY, bytes(blob), CTX) == b"transfer 100 EUR"


def test_nonces_differ_between_seals() -> None:
    a, b = seal(KEY, b"same", CTX), seal(KEY, b"same", CTX)
    assert parse_header(a).nonce != parse_header(b).nonce
    assert a != b


@given(st.binary(max_size=4096), st.lists(st.text(max_size=20), max_size=5))
@settings(max_examples=50, deadline=None)
def test_round_trip_any_input(data: bytes, fields: list[str]) -> None:
    ctx = encode_context(*fields)
    assert open_sealed(KEY, seal(KEY, data, ctx), ctx) == data


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    blob = bytearray(seal(KEY, b"observation: balance 1234.56", CTX))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionFailedError):
        open_sealed(KEY, bytes(blob), CTX)


@pytest.mark.parametrize(
    "other",
    [
        ("sandboxsec/trajectory/v1", "tn_b", "ss_1", "tr_1", "data", "action"),  # other tenant
        ("sandboxsec/trajectory/v1", "tn_a", "ss_2", "tr_1", "data", "action"),  # other session
        ("sandboxsec/trajectory/v1", "tn_a", "ss_1", "tr_2", "data", "action"),  # other record
        ("sandboxsec/trajectory/v1", "tn_a", "ss_1", "tr_1", "meta", "action"),  # other part
        ("sandboxsec/trajectory/v1", "tn_a", "ss_1", "tr_1", "data", "screenshot"),  # kind
    ],
)
def test_moved_ciphertext_fails(other: tuple[str, ...]) -> None:
    blob = seal(KEY, b"secret", CTX)
    with pytest.raises(DecryptionFailedError):
        open_sealed(KEY, blob, encode_context(*other))


def test_other_key_fails() -> None:
    blob = seal(KEY, b"secret", CTX)
    with pytest.raises(DecryptionFailedError):
        open_sealed(DataKey.generate(), blob, CTX)


def test_commitment_is_checked_before_decryption() -> None:
    # A second key that claims the same id: the commitment differs, so it is refused even
    # though the header names it.
    impostor = DataKey.from_material(KEY.dek_id, bytes(32))
    blob = seal(KEY, b"secret", CTX)
    with pytest.raises(DecryptionFailedError):
        open_sealed(impostor, blob, CTX)


@pytest.mark.parametrize("cut", [0, 1, HEADER_BYTES, OVERHEAD_BYTES - 1])
def test_truncated_blob_fails(cut: int) -> None:
    blob = seal(KEY, b"", CTX)
    with pytest.raises(DecryptionFailedError):
        open_sealed(KEY, bytes(blob[:cut]), CTX)


def test_unknown_format_or_suite_fails() -> None:
    for index in (0, 1):
        blob = bytearray(seal(KEY, b"x", CTX))
        blob[index] = 0x7F
        with pytest.raises(DecryptionFailedError):
            open_sealed(KEY, bytes(blob), CTX)


def test_context_encoding_is_unambiguous() -> None:
    assert encode_context("ab", "c") != encode_context("a", "bc")
    assert encode_context("a", "") != encode_context("a")


def test_key_material_never_in_repr() -> None:
    assert KEY.material.hex() not in repr(KEY)
    assert repr(KEY.material) not in repr(KEY)


def test_wrap_round_trip_and_binding() -> None:
    kek = bytes(range(32))
    wrapped = wrap_secret(kek, KEY.material, b"tenant a v1")
    assert unwrap_secret(kek, wrapped, b"tenant a v1") == KEY.material
    with pytest.raises(DecryptionFailedError):
        unwrap_secret(kek, wrapped, b"tenant b v1")
    with pytest.raises(DecryptionFailedError):
        unwrap_secret(bytes(32), wrapped, b"tenant a v1")
    with pytest.raises(DecryptionFailedError):
        unwrap_secret(kek, wrapped[:10], b"tenant a v1")


def test_bad_key_sizes_refused() -> None:
    with pytest.raises(ValueError):
        DataKey.from_material(b"short", bytes(32))
    with pytest.raises(ValueError):
        DataKey.from_material(bytes(16), bytes(16))


def test_forked_child_never_reuses_the_parents_nonces() -> None:
    import os

    seal(KEY, b"prime the nonce pool", CTX)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: seal once, report the nonce, leave without cleanup
        os.write(write, parse_header(seal(KEY, b"child", CTX)).nonce)
        os._exit(0)
    os.close(write)
    child_nonce = os.read(read, 12)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child_nonce) == 12
    assert child_nonce != parse_header(seal(KEY, b"parent", CTX)).nonce
