"""TPM 2.0 quote evidence: strict parsers and the checks on one quote.

Contract: every function takes bytes and values and either returns a frozen result or raises
one of the typed errors of :mod:`sandboxsec.attestation.errors`; nothing here reads the clock,
the disk or the network.  Hostile input never raises anything else.

``TPMS_ATTEST`` and ``TPMT_SIGNATURE`` are parsed with a small big-endian reader that applies
the same size limits as the TSS marshalling code (a differential test checks the two agree on
random and mutated bytes); they sit on the hot path of every verification, where the generic
cffi unmarshaller costs more than the signature check itself.  ``TPM2B_PUBLIC`` goes through
tpm2-pytss ``unmarshal`` and is cached by its bytes, because AKs repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

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

__all__ = [
    "HASH_ALGS",
    "AkPublic",
    "AttestHeader",
    "ClockInfo",
    "PcrSelection",
    "Quote",
    "QuotePolicy",
    "QuoteSignature",
    "check_clock",
    "check_nonce",
    "check_pcr_digest",
    "check_structure",
    "parse_ak_public",
    "parse_attest_header",
    "parse_quote",
    "parse_signature",
    "pcr_composite_digest",
    "verify_attest_signature",
    "verify_signature",
]

TPM_GENERATED_VALUE: Final = 0xFF544347
TPM_ST_ATTEST_QUOTE: Final = 0x8018
TPM_ST_ATTEST_CERTIFY: Final = 0x8017

# TPM_ALG_ID values named by more than one parser here and in certify.py.
ALG_RSA: Final = 0x0001
ALG_SHA256: Final = 0x000B
ALG_NULL: Final = 0x0010
ALG_ECDSA: Final = 0x0018
ALG_ECC: Final = 0x0023
CURVE_P256: Final = 0x0003

# TPMA_OBJECT bits.
TPMA_FIXED_TPM: Final = 0x00000002
TPMA_FIXED_PARENT: Final = 0x00000010
TPMA_SENSITIVE_DATA_ORIGIN: Final = 0x00000020
TPMA_RESTRICTED: Final = 0x00010000
TPMA_DECRYPT: Final = 0x00020000
TPMA_SIGN: Final = 0x00040000

#: TPM_ALG_ID -> (name, digest size) of the hash algorithms this module can compute.
HASH_ALGS: Final[Mapping[int, tuple[str, int]]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
}
_HASH_IDS: Final = {name: alg for alg, (name, _) in HASH_ALGS.items()}
_CRYPTO_HASHES: Final[Mapping[str, hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1(),  # noqa: S303 - named only so it can be refused explicitly
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}

# Signature schemes by TPM_ALG_ID; only the first three can be verified here.
_SIG_ECDSA: Final = ALG_ECDSA
_SIG_RSASSA: Final = 0x0014
_SIG_RSAPSS: Final = 0x0016
_SIG_NAMES: Final[Mapping[int, str]] = {
    _SIG_ECDSA: "ecdsa",
    _SIG_RSASSA: "rsassa",
    _SIG_RSAPSS: "rsapss",
    0x001A: "ecdaa",
    0x001B: "sm2",
    0x001C: "ecschnorr",
    0x0005: "hmac",
}
_ECC_SIGS: Final = frozenset({0x0018, 0x001A, 0x001B, 0x001C})
_RSA_SIGS: Final = frozenset({_SIG_RSASSA, _SIG_RSAPSS})

# TSS buffer limits (sizeof the union each TPM2B wraps), so oversize fields are refused.
MAX_NAME: Final = 68  # TPMU_NAME
_MAX_DATA: Final = 66  # TPMT_HA
_MAX_DIGEST: Final = 64  # TPMU_HA
_MAX_ECC_PARAM: Final = 128  # MAX_ECC_KEY_BYTES in the TSS headers
_MAX_RSA_SIG: Final = 512  # TPM2_MAX_RSA_KEY_BYTES
_MAX_PCR_SELECTIONS: Final = 16  # TPM2_NUM_PCR_BANKS
_MAX_PCR_SELECT: Final = 4  # TPM2_PCR_SELECT_MAX

_CURVES: Final[Mapping[int, ec.EllipticCurve]] = {
    CURVE_P256: ec.SECP256R1(),
    0x0004: ec.SECP384R1(),
    0x0005: ec.SECP521R1(),
}


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: the TPM's clock and its reset/restart counters."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One bank of a TPML_PCR_SELECTION, indices ascending (the order the TPM hashes them)."""

    bank: str
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Quote:
    """A parsed TPMS_ATTEST of type quote; ``raw`` is exactly what the AK signed."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True, slots=True)
class QuoteSignature:
    """A parsed TPMT_SIGNATURE: scheme, hash and the signature in the form pyca verifies."""

    scheme: str
    hash_alg: str
    value: bytes  # DER (r, s) for ECDSA, the raw signature for RSA


@dataclass(frozen=True, slots=True)
class AkPublic:
    """The attestation key: its TPM name, attributes and the key as a pyca object."""

    raw: bytes
    name: bytes  # nameAlg (2 bytes) || H(TPMT_PUBLIC)
    name_alg: str
    key_type: str  # "ecc" or "rsa"
    attributes: int
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = field(compare=False)

    @property
    def name_hex(self) -> str:
        return self.name.hex()


@dataclass(frozen=True, slots=True)
class QuotePolicy:
    """Algorithms a quote may use; anything else is a downgrade and refused.

    The default pins ECDSA with SHA-256/384 and RSA (PSS or PKCS#1 v1.5) with SHA-256/384,
    the SHA-256/384 PCR banks, P-256/P-384 AKs and RSA AKs of at least 2048 bits.
    """

    signatures: frozenset[tuple[str, str]] = frozenset(
        {
            ("ecdsa", "sha256"),
            ("ecdsa", "sha384"),
            ("rsassa", "sha256"),
            ("rsassa", "sha384"),
            ("rsapss", "sha256"),
            ("rsapss", "sha384"),
        }
    )
    banks: frozenset[str] = frozenset({"sha256", "sha384"})
    name_algs: frozenset[str] = frozenset({"sha256", "sha384"})
    curves: frozenset[str] = frozenset({"secp256r1", "secp384r1"})
    min_rsa_bits: int = 2048


class _Reader:
    """Big-endian cursor over TPM marshalled bytes; any overrun is ``error``."""

    __slots__ = ("_data", "_error", "_pos")

    def __init__(self, data: bytes, error: type[Exception]) -> None:
        self._data = data
        self._pos = 0
        self._error = error

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            raise self._error(f"truncated at byte {self._pos}: needs {n} more")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = struct.unpack(">H", self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = struct.unpack(">I", self.take(4))[0]
        return v

    def u64(self) -> int:
        v: int = struct.unpack(">Q", self.take(8))[0]
        return v

    def tpm2b(self, limit: int, what: str) -> bytes:
        size = self.u16()
        if size > limit:
            raise self._error(f"{what} is {size} bytes, more than {limit}")
        return self.take(size)

    def done(self) -> None:
        if self._pos != len(self._data):
            raise self._error(f"{len(self._data) - self._pos} trailing bytes")


_HEAD = struct.Struct(">IHH")
_ATTEST_NAMES: Final = {TPM_ST_ATTEST_QUOTE: "TPM_ST_ATTEST_QUOTE",
                        TPM_ST_ATTEST_CERTIFY: "TPM_ST_ATTEST_CERTIFY"}
_CLOCK_FW = struct.Struct(">QIIBQ")  # TPMS_CLOCK_INFO, firmwareVersion


@dataclass(frozen=True, slots=True)
class AttestHeader:
    """The fields every TPMS_ATTEST starts with, whatever its type."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int


def parse_attest_header(
    data: bytes, expected_type: int, *, malformed: type[Exception], wrong_type: type[Exception],
) -> tuple[AttestHeader, int]:
    """Read magic, type, qualifiedSigner, extraData, clockInfo and firmwareVersion of a
    marshalled TPMS_ATTEST; returns them and the offset of the type-specific part.

    Raises ``wrong_type`` for a structure of another type than ``expected_type`` and
    ``malformed`` for bytes that do not parse.  The magic is returned, not checked.
    """
    # Offsets are tracked by hand (no reader object): this runs once per verification.
    size = len(data)
    if size < _HEAD.size:
        raise malformed("truncated TPMS_ATTEST header")
    magic, st, signer_len = _HEAD.unpack_from(data, 0)
    if st != expected_type:
        want = _ATTEST_NAMES.get(expected_type, f"{expected_type:#06x}")
        raise wrong_type(f"attestation type {st:#06x} is not {want}")
    if signer_len > MAX_NAME:
        raise malformed(f"qualifiedSigner is {signer_len} bytes, more than {MAX_NAME}")
    pos = _HEAD.size + signer_len
    if pos + 2 > size:
        raise malformed("truncated qualifiedSigner")
    signer = data[_HEAD.size : pos]
    extra_len = int.from_bytes(data[pos : pos + 2], "big")
    if extra_len > _MAX_DATA:
        raise malformed(f"extraData is {extra_len} bytes, more than {_MAX_DATA}")
    extra = data[pos + 2 : pos + 2 + extra_len]
    pos += 2 + extra_len
    if pos + _CLOCK_FW.size > size:
        raise malformed("truncated extraData or clockInfo")
    clk, resets, restarts, safe, firmware = _CLOCK_FW.unpack_from(data, pos)
    header = AttestHeader(
        magic=magic, type=st, qualified_signer=signer, extra_data=extra,
        clock=ClockInfo(clock=clk, reset_count=resets, restart_count=restarts, safe=safe != 0),
        firmware_version=firmware,
    )
    return header, pos + _CLOCK_FW.size


def parse_quote(data: bytes) -> Quote:
    """Parse a marshalled TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE.

    Raises :class:`QuoteMalformedError` for bytes that do not parse (including trailing
    bytes) and :class:`QuoteTypeInvalidError` for a well-formed structure of another type.
    The magic is returned, not checked: :func:`check_structure` does that.
    """
    head, pos = parse_attest_header(data, TPM_ST_ATTEST_QUOTE, malformed=QuoteMalformedError,
                                    wrong_type=QuoteTypeInvalidError)
    size = len(data)
    if pos + 4 > size:
        raise QuoteMalformedError("truncated PCR selection")
    count = int.from_bytes(data[pos : pos + 4], "big")
    pos += 4
    if count > _MAX_PCR_SELECTIONS:
        raise QuoteMalformedError(f"{count} PCR selections, more than {_MAX_PCR_SELECTIONS}")
    selections = []
    for _ in range(count):
        if pos + 3 > size:
            raise QuoteMalformedError("truncated PCR selection")
        alg = (data[pos] << 8) | data[pos + 1]
        select_size = data[pos + 2]
        if select_size > _MAX_PCR_SELECT:
            raise QuoteMalformedError(f"PCR select of {select_size} bytes")
        bitmap = data[pos + 3 : pos + 3 + select_size]
        if len(bitmap) != select_size:
            raise QuoteMalformedError("truncated PCR select bitmap")
        pos += 3 + select_size
        bank = HASH_ALGS.get(alg, (f"alg_{alg:#06x}", 0))[0]
        indices = tuple(
            byte * 8 + bit
            for byte, value in enumerate(bitmap)
            if value
            for bit in range(8)
            if value >> bit & 1
        )
        selections.append(PcrSelection(bank=bank, indices=indices))
    if pos + 2 > size:
        raise QuoteMalformedError("truncated pcrDigest")
    digest_len = int.from_bytes(data[pos : pos + 2], "big")
    if digest_len > _MAX_DIGEST:
        raise QuoteMalformedError(f"pcrDigest is {digest_len} bytes, more than {_MAX_DIGEST}")
    if pos + 2 + digest_len != size:
        raise QuoteMalformedError("pcrDigest length does not end the structure")
    return Quote(
        raw=data,
        magic=head.magic,
        type=head.type,
        qualified_signer=head.qualified_signer,
        extra_data=head.extra_data,
        clock=head.clock,
        firmware_version=head.firmware_version,
        selections=tuple(selections),
        pcr_digest=data[pos + 2 :],
    )


def parse_signature(data: bytes) -> QuoteSignature:
    """Parse a marshalled TPMT_SIGNATURE into a verifiable form.

    Raises :class:`QuoteSignatureMalformedError` for bytes that do not parse and
    :class:`QuoteAlgorithmRefusedError` for schemes this verifier cannot check (HMAC,
    ECDAA, SM2, Schnorr) or unknown hash algorithms.
    """
    r = _Reader(data, QuoteSignatureMalformedError)
    alg = r.u16()
    if alg not in _SIG_NAMES:
        raise QuoteSignatureMalformedError(f"unknown signature algorithm {alg:#06x}")
    hash_id = r.u16()
    if alg in _ECC_SIGS:
        sig_r = r.tpm2b(_MAX_ECC_PARAM, "signatureR")
        sig_s = r.tpm2b(_MAX_ECC_PARAM, "signatureS")
        r.done()
        value = encode_dss_signature(int.from_bytes(sig_r, "big"), int.from_bytes(sig_s, "big"))
    elif alg in _RSA_SIGS:
        value = r.tpm2b(_MAX_RSA_SIG, "rsa signature")
        r.done()
    else:
        raise QuoteAlgorithmRefusedError(f"signature scheme {_SIG_NAMES[alg]} is not accepted")
    if alg not in (_SIG_ECDSA, _SIG_RSASSA, _SIG_RSAPSS):
        raise QuoteAlgorithmRefusedError(f"signature scheme {_SIG_NAMES[alg]} is not accepted")
    if hash_id not in HASH_ALGS:
        raise QuoteAlgorithmRefusedError(f"signature hash {hash_id:#06x} is not accepted")
    return QuoteSignature(scheme=_SIG_NAMES[alg], hash_alg=HASH_ALGS[hash_id][0], value=value)


@lru_cache(maxsize=4096)
def parse_ak_public(data: bytes) -> AkPublic:
    """Parse a TPM2B_PUBLIC of an attestation key and compute its TPM name.

    Checks the key is an AK: restricted, signing, not decrypting, fixedTPM, fixedParent and
    generated inside the TPM.  Raises :class:`AkPublicMalformedError` or
    :class:`AkAttributesInvalidError`.  Results are cached by the bytes (AKs repeat).
    """
    # Imported lazily: tpm2-pytss loads the TSS shared libraries, which offline tools
    # verifying only tokens or event logs do not need.
    from tpm2_pytss.types import TPM2B_PUBLIC

    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise AkPublicMalformedError("TPM2B_PUBLIC size prefix does not match its length")
    try:
        pub, used = TPM2B_PUBLIC.unmarshal(data)
        area = pub.publicArea
        canonical = area.marshal()
        key_type = int(area.type)
        name_alg = int(area.nameAlg)
        attributes = int(area.objectAttributes)
        if key_type == ALG_ECC:
            curve_id = int(area.parameters.eccDetail.curveID)
            x = bytes(area.unique.ecc.x)
            y = bytes(area.unique.ecc.y)
            rsa_n = b""
            exponent = 0
        elif key_type == ALG_RSA:
            curve_id = 0
            x = y = b""
            rsa_n = bytes(area.unique.rsa)
            exponent = int(area.parameters.rsaDetail.exponent) or 65537
        else:
            raise AkPublicMalformedError(f"AK type {key_type:#06x} is neither RSA nor ECC")
    except AkPublicMalformedError:
        raise
    except Exception as exc:  # the TSS raises TSS2_Exception, cffi TypeError/ValueError
        raise AkPublicMalformedError(f"TPM2B_PUBLIC does not parse: {type(exc).__name__}") from None
    # 1. The bytes must be the canonical marshalling, since the name hashes them.
    if used != len(data) or canonical != data[2:]:
        raise AkPublicMalformedError("TPM2B_PUBLIC is not canonically marshalled")
    if name_alg not in HASH_ALGS:
        raise AkAttributesInvalidError(f"AK name algorithm {name_alg:#06x} is not supported")
    name_alg_str = HASH_ALGS[name_alg][0]
    # 2. An AK signs only what the TPM itself produced: restricted, sign, never decrypt.
    required = (TPMA_FIXED_TPM | TPMA_FIXED_PARENT | TPMA_SENSITIVE_DATA_ORIGIN
                | TPMA_RESTRICTED | TPMA_SIGN)
    if attributes & required != required or attributes & TPMA_DECRYPT:
        raise AkAttributesInvalidError(
            f"AK attributes {attributes:#010x} are not a restricted fixedTPM signing key"
        )
    # 3. The key itself.
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    try:
        if key_type == ALG_ECC:
            curve = _CURVES.get(curve_id)
            if curve is None:
                raise AkPublicMalformedError(f"AK curve {curve_id:#06x} is not supported")
            size = (curve.key_size + 7) // 8
            if len(x) != size or len(y) != size:
                raise AkPublicMalformedError("AK point has the wrong coordinate size")
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, b"\x04" + x + y)
        else:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(rsa_n, "big")).public_key()
    except AkPublicMalformedError:
        raise
    except (ValueError, UnsupportedAlgorithm):
        raise AkPublicMalformedError("AK public key is not a valid key") from None
    name = name_alg.to_bytes(2, "big") + hashlib.new(name_alg_str, canonical).digest()
    return AkPublic(
        raw=data,
        name=name,
        name_alg=name_alg_str,
        key_type="ecc" if key_type == ALG_ECC else "rsa",
        attributes=attributes,
        key=key,
    )


def check_structure(quote: Quote) -> None:
    """The quote was generated by a TPM: magic is TPM_GENERATED_VALUE, type is a quote."""
    if quote.magic != TPM_GENERATED_VALUE:
        raise QuoteMagicInvalidError(f"magic {quote.magic:#010x} is not TPM_GENERATED_VALUE")
    if quote.type != TPM_ST_ATTEST_QUOTE:
        raise QuoteTypeInvalidError(f"attestation type {quote.type:#06x} is not a quote")


def check_nonce(quote: Quote, nonce: bytes) -> None:
    """The quote's extraData is exactly the nonce the service issued."""
    if not hmac.compare_digest(quote.extra_data, nonce):
        raise QuoteNonceMismatchError("the quote's extraData is not the issued nonce")


def verify_signature(
    quote: Quote, signature: QuoteSignature, ak: AkPublic, policy: QuotePolicy
) -> None:
    """Verify the AK's signature over the quote, with algorithms pinned by ``policy``.

    Raises :class:`QuoteAlgorithmRefusedError` for any scheme, hash, curve, key size or AK
    name algorithm outside the policy (checked before the signature, so a downgrade is
    named as such) and :class:`QuoteSignatureInvalidError` when the signature is wrong.
    """
    verify_attest_signature(quote.raw, signature, ak, policy)


def verify_attest_signature(
    attest: bytes, signature: QuoteSignature, ak: AkPublic, policy: QuotePolicy
) -> None:
    """:func:`verify_signature` over the raw bytes of any TPMS_ATTEST the AK signed (a quote,
    a certify); same errors."""
    # 1. Algorithms first: a downgraded signature is refused even if it verifies.
    if (signature.scheme, signature.hash_alg) not in policy.signatures:
        raise QuoteAlgorithmRefusedError(
            f"{signature.scheme} with {signature.hash_alg} is not allowed by the quote policy"
        )
    if ak.name_alg not in policy.name_algs:
        raise QuoteAlgorithmRefusedError(f"AK name algorithm {ak.name_alg} is not allowed")
    # 2. The key must match the scheme and be strong enough.
    key = ak.key
    chosen = _CRYPTO_HASHES[signature.hash_alg]
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if signature.scheme != "ecdsa":
                raise QuoteAlgorithmRefusedError("an ECC AK must sign with ECDSA")
            if key.curve.name not in policy.curves:
                raise QuoteAlgorithmRefusedError(f"AK curve {key.curve.name} is not allowed")
            key.verify(signature.value, attest, ec.ECDSA(chosen))
        else:
            if signature.scheme not in ("rsassa", "rsapss"):
                raise QuoteAlgorithmRefusedError("an RSA AK must sign with RSASSA or RSAPSS")
            if key.key_size < policy.min_rsa_bits:
                raise QuoteAlgorithmRefusedError(f"AK RSA key of {key.key_size} bits is too small")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if signature.scheme == "rsassa"
                else padding.PSS(mgf=padding.MGF1(chosen), salt_length=padding.PSS.AUTO)
            )
            key.verify(signature.value, attest, pad, chosen)
    except InvalidSignature:
        msg = "the quote signature does not verify under the AK"
        raise QuoteSignatureInvalidError(msg) from None


def pcr_composite_digest(
    selections: tuple[PcrSelection, ...], pcrs: Mapping[str, Mapping[int, bytes]], hash_alg: str
) -> bytes:
    """Hash of the PCR values concatenated in selection order (what the TPM signs)."""
    h = hashlib.new(hash_alg)
    for sel in selections:
        bank = pcrs[sel.bank]
        for index in sel.indices:
            h.update(bank[index])
    return h.digest()


def check_pcr_digest(
    quote: Quote,
    pcrs: Mapping[str, Mapping[int, bytes]],
    hash_alg: str,
    policy: QuotePolicy,
) -> None:
    """The reported PCR values are exactly the selected ones and hash to ``pcrDigest``.

    ``hash_alg`` is the signature's hash (the TPM digests PCRs with the signing scheme's hash).
    """
    # 1. Every selected bank is allowed, and the reported set equals the selected set.
    selected: dict[str, set[int]] = {}
    for sel in quote.selections:
        if sel.bank not in policy.banks:
            raise QuoteAlgorithmRefusedError(f"PCR bank {sel.bank} is not allowed")
        if sel.bank in selected:
            raise QuotePcrSelectionError(f"bank {sel.bank} is selected twice")
        selected[sel.bank] = set(sel.indices)
    if not any(selected.values()):
        raise QuotePcrSelectionError("the quote selects no PCR")
    reported = {bank: set(values) for bank, values in pcrs.items() if values}
    if reported != {bank: idx for bank, idx in selected.items() if idx}:
        raise QuotePcrSelectionError("the reported PCRs are not the PCRs the quote selects")
    for bank in selected:
        size = HASH_ALGS[_HASH_IDS[bank]][1]
        if any(len(pcrs[bank][i]) != size for i in selected[bank]):
            raise QuotePcrSelectionError(f"a reported {bank} PCR value has the wrong length")
    # 2. The composite digest matches what the AK signed.
    expected = pcr_composite_digest(quote.selections, pcrs, hash_alg)
    if not hmac.compare_digest(expected, quote.pcr_digest):
        raise QuotePcrDigestMismatchError("the reported PCR values do not hash to pcrDigest")


def check_clock(clock: ClockInfo, previous: ClockInfo | None) -> None:
    """The TPM clock is safe and never went backwards since the last quote of this AK.

    Reset and restart counts are compared in order, then the clock itself; a quote that
    compares lower than the last accepted one is stale (a rollback or a replay).  The counts
    are only meaningful for AKs in the endorsement hierarchy (others see obfuscated values).
    """
    if not clock.safe:
        raise QuoteClockUnsafeError("the TPM clock is not safe")
    if previous is None:
        return
    now = (clock.reset_count, clock.restart_count, clock.clock)
    before = (previous.reset_count, previous.restart_count, previous.clock)
    if clock.reset_count < previous.reset_count:
        raise QuoteClockRollbackError(
            f"reset count {clock.reset_count} is below the last seen {previous.reset_count}"
        )
    if now < before:
        raise QuoteClockRollbackError("restart count or clock went backwards for this AK")
