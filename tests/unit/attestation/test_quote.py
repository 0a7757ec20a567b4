"""Quote, signature and AK parsing and checks, against software-made TPM structures."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tpm2_pytss.types import TPMS_ATTEST

from sandboxsec.attestation import quote
from sandboxsec.attestation.errors import (
    AkAttributesInvalidError,
    AkPublicMalformedError,
    QuoteAlgorithmRefusedError,
    QuoteClockRollbackError,
    QuoteClockUnsafeError,
    QuoteMagicInvalidError,
    QuoteMalformedError,
    QuoteNonceMismatchError,
    QuotePcrDigestMismatchError,
    QuotePcrSelectionError,
    QuoteSignatureInvalidError,
    QuoteSignatureMalformedError,
    QuoteTypeInvalidError,
)
from sandboxsec.errors import SandboxSecError
from tests.support.softtpm import AK_ATTRS, SoftAk, marshal_quote, sign_quote, tpm2b

NONCE = bytes(range(32))
PCRS = {"sha256": {i: bytes([i]) * 32 for i in range(8)}}
POLICY = quote.QuotePolicy()
_AK = SoftAk()


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


def test_parse_quote_fields() -> None:
    raw = marshal_quote(NONCE, PCRS, clock=77, reset=3, restart=2)
    q = quote.parse_quote(raw)
    assert q.magic == 0xFF544347 and q.type == 0x8018
    assert q.extra_data == NONCE
    assert q.clock == quote.ClockInfo(clock=77, reset_count=3, restart_count=2, safe=True)
    assert q.selections == (quote.PcrSelection("sha256", tuple(range(8))),)
    quote.check_structure(q)
    quote.check_nonce(q, NONCE)


def test_wrong_magic_and_type() -> None:
    with pytest.raises(QuoteMagicInvalidError):
        quote.check_structure(quote.parse_quote(marshal_quote(NONCE, PCRS, magic=0xFF544346)))
    with pytest.raises(QuoteTypeInvalidError):
        quote.parse_quote(marshal_quote(NONCE, PCRS, st=0x8017))


def test_nonce_mismatch() -> None:
    q = quote.parse_quote(marshal_quote(NONCE, PCRS))
    with pytest.raises(QuoteNonceMismatchError):
        quote.check_nonce(q, flip(NONCE, 5))


@pytest.mark.parametrize("cut", [0, 1, 5, 20, 60, -1])
def test_truncated_or_trailing_quote(cut: int) -> None:
    raw = marshal_quote(NONCE, PCRS)
    with pytest.raises(QuoteMalformedError):
        quote.parse_quote(raw[:cut] if cut >= 0 else raw + b"\x00")


def test_signature_verifies_and_detects_flips() -> None:
    raw = marshal_quote(NONCE, PCRS)
    sig = quote.parse_signature(sign_quote(_AK, raw))
    ak = quote.parse_ak_public(_AK.public)
    q = quote.parse_quote(raw)
    quote.verify_signature(q, sig, ak, POLICY)
    with pytest.raises(QuoteSignatureInvalidError):
        quote.verify_signature(quote.parse_quote(flip(raw, 40)), sig, ak, POLICY)
    bad = flip(sign_quote(_AK, raw), 10)
    with pytest.raises(QuoteSignatureInvalidError):
        quote.verify_signature(q, quote.parse_signature(bad), ak, POLICY)
    other = quote.parse_ak_public(SoftAk().public)
    with pytest.raises(QuoteSignatureInvalidError):
        quote.verify_signature(q, sig, other, POLICY)


def test_sha1_signature_is_a_refused_downgrade() -> None:
    raw = marshal_quote(NONCE, PCRS, hash_alg="sha1")
    sig = quote.parse_signature(sign_quote(_AK, raw, hash_alg="sha1"))
    assert sig.hash_alg == "sha1"
    with pytest.raises(QuoteAlgorithmRefusedError):
        quote.verify_signature(
            quote.parse_quote(raw), sig, quote.parse_ak_public(_AK.public), POLICY
        )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (struct.pack(">HH", 0x0005, 0x000B) + bytes(32), QuoteAlgorithmRefusedError),  # HMAC
        (
            struct.pack(">HH", 0x001A, 0x000B) + tpm2b(b"r") + tpm2b(b"s"),
            QuoteAlgorithmRefusedError,
        ),
        (struct.pack(">HH", 0x0099, 0x000B), QuoteSignatureMalformedError),
        (
            struct.pack(">HH", 0x0018, 0x0099) + tpm2b(b"r") + tpm2b(b"s"),
            QuoteAlgorithmRefusedError,
        ),
        (struct.pack(">HH", 0x0018, 0x000B) + tpm2b(b"r"), QuoteSignatureMalformedError),
        (b"", QuoteSignatureMalformedError),
    ],
)
def test_signature_parse_refusals(data: bytes, error: type[SandboxSecError]) -> None:
    with pytest.raises(error):
        quote.parse_signature(data)


def test_ak_name_and_attributes() -> None:
    ak = quote.parse_ak_public(_AK.public)
    assert ak.name == _AK.name and ak.key_type == "ecc" and ak.name_alg == "sha256"
    with pytest.raises(AkAttributesInvalidError):
        quote.parse_ak_public(SoftAk(attributes=int(AK_ATTRS) & ~0x00010000).public)  # restricted
    with pytest.raises(AkAttributesInvalidError):
        quote.parse_ak_public(SoftAk(attributes=int(AK_ATTRS) | 0x00020000).public)  # decrypt
    with pytest.raises(AkPublicMalformedError):
        quote.parse_ak_public(_AK.public + b"\x00")
    with pytest.raises(AkPublicMalformedError):
        quote.parse_ak_public(b"\x00\x02\x00\x99")


def test_pcr_digest_checks() -> None:
    raw = marshal_quote(NONCE, PCRS)
    q = quote.parse_quote(raw)
    quote.check_pcr_digest(q, PCRS, "sha256", POLICY)
    tampered = {"sha256": {**PCRS["sha256"], 3: flip(PCRS["sha256"][3], 0)}}
    with pytest.raises(QuotePcrDigestMismatchError):
        quote.check_pcr_digest(q, tampered, "sha256", POLICY)
    missing = {"sha256": {i: v for i, v in PCRS["sha256"].items() if i != 7}}
    with pytest.raises(QuotePcrSelectionError):
        quote.check_pcr_digest(q, missing, "sha256", POLICY)
    extra = {"sha256": {**PCRS["sha256"], 9: bytes(32)}}
    with pytest.raises(QuotePcrSelectionError):
        quote.check_pcr_digest(q, extra, "sha256", POLICY)
    short = {"sha256": {**PCRS["sha256"], 0: bytes(20)}}
    with pytest.raises(QuotePcrSelectionError):
        quote.check_pcr_digest(q, short, "sha256", POLICY)
    sha1 = {"sha1": {0: bytes(20)}}
    with pytest.raises(QuoteAlgorithmRefusedError):
        quote.check_pcr_digest(
            quote.parse_quote(marshal_quote(NONCE, sha1)), sha1, "sha256", POLICY
        )


def test_clock_rules() -> None:
    prev = quote.ClockInfo(clock=500, reset_count=4, restart_count=2, safe=True)
    quote.check_clock(quote.ClockInfo(600, 4, 2, True), prev)
    quote.check_clock(quote.ClockInfo(1, 5, 0, True), prev)  # a reboot resets the clock
    quote.check_clock(quote.ClockInfo(1, 4, 3, True), None)
    with pytest.raises(QuoteClockUnsafeError):
        quote.check_clock(quote.ClockInfo(600, 4, 2, False), prev)
    with pytest.raises(QuoteClockRollbackError):
        quote.check_clock(quote.ClockInfo(900, 3, 9, True), prev)
    with pytest.raises(QuoteClockRollbackError):
        quote.check_clock(quote.ClockInfo(900, 4, 1, True), prev)
    with pytest.raises(QuoteClockRollbackError):
        quote.check_clock(quote.ClockInfo(499, 4, 2, True), prev)


# -- fuzzing: a reason code, never a crash --------------------------------------------------

_VALID = marshal_quote(NONCE, PCRS)
_VALID_SIG = sign_quote(_AK, _VALID)


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "cut" and data:
            i = draw(st.integers(0, len(data)))
            data = data[:i] + data[i + draw(st.integers(0, 8)) :]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(max_size=8))
    return bytes(data)


def _tss_parse(data: bytes) -> TPMS_ATTEST | None:
    try:
        obj, used = TPMS_ATTEST.unmarshal(data)
    except Exception:
        return None
    return obj if used == len(data) else None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=200), mutated(_VALID)))
def test_quote_parser_agrees_with_tss_unmarshal(data: bytes) -> None:
    """Differential: our parser accepts exactly the quotes the TSS unmarshaller accepts."""
    try:
        ours = quote.parse_quote(data)
    except (QuoteMalformedError, QuoteTypeInvalidError):
        ours = None
    theirs = _tss_parse(data)
    if theirs is not None and int(theirs.type) == 0x8018:
        assert ours is not None
        assert ours.magic == int(theirs.magic)
        assert ours.extra_data == bytes(theirs.extraData)
        assert ours.clock.reset_count == int(theirs.clockInfo.resetCount)
        assert ours.pcr_digest == bytes(theirs.attested.quote.pcrDigest)
    elif ours is not None:
        assert theirs is not None, "our parser accepted bytes the TSS refuses"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), mutated(_VALID_SIG), mutated(_AK.public)))
def test_parsers_answer_reason_codes(data: bytes) -> None:
    for parse in (quote.parse_quote, quote.parse_signature, quote.parse_ak_public):
        try:
            parse(data)
        except SandboxSecError as exc:
            assert exc.reason
