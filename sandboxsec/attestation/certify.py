"""The session key: a TPM-resident signing key, certified by the bound AK (TPM2_Certify).

With its evidence the sandbox sends the session key's ``TPM2B_PUBLIC`` and a ``TPM2_Certify``
of it (``TPMS_ATTEST`` + ``TPMT_SIGNATURE``) made by the attesting AK with the attestation
nonce as qualifying data.  :func:`verify_session_key` checks, in order:

1. the public area parses canonically and is an ECC P-256 key with a SHA-256 name, whose
   attributes are fixedTPM, fixedParent, sensitiveDataOrigin and sign, with restricted and
   decrypt clear (a key the TPM made and will never export, that signs arbitrary digests);
2. the certify structure parses; its magic is TPM_GENERATED_VALUE and its type
   TPM_ST_ATTEST_CERTIFY;
3. its signature verifies under the AK, with the quote policy's pinned algorithms (never
   under the session key: an unrestricted key can sign a forged TPMS_ATTEST);
4. (its qualifiedSigner is a *qualified* name, which depends on the AK's parent chain; the
   signature of step 3 is what identifies the signer);
5. its extraData is the attestation nonce, byte for byte;
6. the certified name equals nameAlg || H(TPMT_PUBLIC) recomputed from the public area sent.

A TPM refuses to certify an object loaded with only its public part (there is no authValue
to authorise the certify), so a software key whose public area claims fixedTPM cannot be
certified: step 6 refuses it.  ``resetCount``, ``restartCount`` and ``firmwareVersion`` of a
certify by a key outside the endorsement and platform hierarchies are obfuscated and are not
used.

Contract: pure (bytes and values in, :class:`SessionKey` out or a typed error of
:mod:`sandboxsec.attestation.certify_errors`).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from sandboxsec.attestation import quote
from sandboxsec.attestation.certify_errors import (
    SessionKeyAlgorithmRefusedError,
    SessionKeyAttributesInvalidError,
    SessionKeyCertifyMagicInvalidError,
    SessionKeyCertifyMalformedError,
    SessionKeyCertifyNameMismatchError,
    SessionKeyCertifyNonceMismatchError,
    SessionKeyCertifySignatureInvalidError,
    SessionKeyCertifyTypeInvalidError,
    SessionKeyPublicMalformedError,
)
from sandboxsec.attestation.errors import QuoteSignatureInvalidError
from sandboxsec.attestation.jwk import ec_jwk, jwk_thumbprint
from sandboxsec.errors import SandboxSecError

__all__ = [
    "SESSION_KEY_REQUIRED",
    "TPM_ST_ATTEST_CERTIFY",
    "Certify",
    "SessionKey",
    "parse_certify",
    "parse_session_key",
    "verify_session_key",
]

TPM_ST_ATTEST_CERTIFY: Final = 0x8017
_MAX_NAME: Final = 68  # TPMU_NAME
_MAX_DATA: Final = 66  # TPMT_HA
_ALG_ECC: Final = 0x0023
_ALG_SHA256: Final = 0x000B
_ALG_ECDSA: Final = 0x0018
_ALG_NULL: Final = 0x0010
_CURVE_P256: Final = 0x0003

# TPMA_OBJECT bits.
_FIXED_TPM: Final = 0x00000002
_FIXED_PARENT: Final = 0x00000010
_SENSITIVE_DATA_ORIGIN: Final = 0x00000020
_RESTRICTED: Final = 0x00010000
_DECRYPT: Final = 0x00020000
_SIGN: Final = 0x00040000
#: What a session key must carry.
SESSION_KEY_REQUIRED: Final = _FIXED_TPM | _FIXED_PARENT | _SENSITIVE_DATA_ORIGIN | _SIGN

_HEAD = struct.Struct(">IHH")
_CLOCK_FW = struct.Struct(">QIIBQ")  # TPMS_CLOCK_INFO, firmwareVersion


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A verified session key: its TPM name, its JWK and the JWK's RFC 7638 thumbprint."""

    name: bytes
    jwk: dict[str, str]
    jkt: str
    attributes: int


@dataclass(frozen=True, slots=True)
class Certify:
    """A parsed TPMS_ATTEST of a certify; ``raw`` is exactly what the AK signed."""

    raw: bytes
    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    name: bytes
    qualified_name: bytes


@lru_cache(maxsize=1024)
def parse_session_key(data: bytes) -> SessionKey:
    """Parse a session key's TPM2B_PUBLIC and check it is a key a TPM holds and never exports.

    Raises :class:`SessionKeyPublicMalformedError`, :class:`SessionKeyAlgorithmRefusedError`
    or :class:`SessionKeyAttributesInvalidError`.
    """
    from tpm2_pytss.types import TPM2B_PUBLIC  # the TSS libraries load lazily, as in quote

    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        raise SessionKeyPublicMalformedError("TPM2B_PUBLIC size prefix does not match its length")
    try:
        pub, used = TPM2B_PUBLIC.unmarshal(data)
        area = pub.publicArea
        canonical = area.marshal()
        key_type, name_alg = int(area.type), int(area.nameAlg)
        attributes = int(area.objectAttributes)
        curve = int(area.parameters.eccDetail.curveID) if key_type == _ALG_ECC else 0
        scheme = int(area.parameters.eccDetail.scheme.scheme) if key_type == _ALG_ECC else 0
        scheme_hash = (int(area.parameters.eccDetail.scheme.details.ecdsa.hashAlg)
                       if scheme == _ALG_ECDSA else 0)
        x = bytes(area.unique.ecc.x) if key_type == _ALG_ECC else b""
        y = bytes(area.unique.ecc.y) if key_type == _ALG_ECC else b""
    except Exception as exc:  # the TSS raises TSS2_Exception, cffi TypeError/ValueError
        raise SessionKeyPublicMalformedError(
            f"TPM2B_PUBLIC does not parse: {type(exc).__name__}") from None
    # 1a. Canonical bytes: the name hashes exactly these.
    if used != len(data) or canonical != data[2:]:
        raise SessionKeyPublicMalformedError("TPM2B_PUBLIC is not canonically marshalled")
    # 1b. ECDSA P-256 with SHA-256 only (the proof algorithm is ES256).
    if key_type != _ALG_ECC or curve != _CURVE_P256:
        raise SessionKeyAlgorithmRefusedError("the session key must be an ECC P-256 key")
    if name_alg != _ALG_SHA256:
        raise SessionKeyAlgorithmRefusedError("the session key's name algorithm must be SHA-256")
    if scheme not in (_ALG_NULL, _ALG_ECDSA) or (scheme == _ALG_ECDSA
                                                 and scheme_hash != _ALG_SHA256):
        raise SessionKeyAlgorithmRefusedError("the session key's scheme must be ECDSA-SHA256")
    # 1c. Non-duplicable, made inside the TPM, an unrestricted signing key.
    if attributes & SESSION_KEY_REQUIRED != SESSION_KEY_REQUIRED:
        raise SessionKeyAttributesInvalidError(
            f"attributes {attributes:#010x} lack fixedTPM, fixedParent, sensitiveDataOrigin "
            "or sign")
    if attributes & (_RESTRICTED | _DECRYPT):
        raise SessionKeyAttributesInvalidError(
            f"attributes {attributes:#010x}: a session key is neither restricted nor decrypting")
    if len(x) != 32 or len(y) != 32:
        raise SessionKeyPublicMalformedError("P-256 coordinates must be 32 bytes each")
    jwk = ec_jwk(x, y)
    try:
        from cryptography.hazmat.primitives.asymmetric import ec

        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + x + y)
    except ValueError:
        raise SessionKeyPublicMalformedError("the session key is not a point on P-256") from None
    name = _ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(canonical).digest()
    return SessionKey(name=name, jwk=jwk, jkt=jwk_thumbprint(jwk), attributes=attributes)


def parse_certify(data: bytes) -> Certify:
    """Parse a marshalled TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY (magic not yet checked).

    Raises :class:`SessionKeyCertifyMalformedError` (including trailing bytes) or
    :class:`SessionKeyCertifyTypeInvalidError`.
    """
    size = len(data)
    if size < _HEAD.size:
        raise SessionKeyCertifyMalformedError("truncated TPMS_ATTEST header")
    magic, st, signer_len = _HEAD.unpack_from(data, 0)
    if st != TPM_ST_ATTEST_CERTIFY:
        raise SessionKeyCertifyTypeInvalidError(
            f"attestation type {st:#06x} is not TPM_ST_ATTEST_CERTIFY")
    pos = _HEAD.size

    def tpm2b(limit: int, what: str, start: int) -> tuple[bytes, int]:
        if start + 2 > size:
            raise SessionKeyCertifyMalformedError(f"truncated {what}")
        length = int.from_bytes(data[start:start + 2], "big")
        if length > limit or start + 2 + length > size:
            raise SessionKeyCertifyMalformedError(f"{what} is {length} bytes, over its limit "
                                                  "or past the end")
        return data[start + 2:start + 2 + length], start + 2 + length

    if signer_len > _MAX_NAME or pos + signer_len > size:
        raise SessionKeyCertifyMalformedError("qualifiedSigner is too long")
    signer = data[pos:pos + signer_len]
    extra, pos = tpm2b(_MAX_DATA, "extraData", pos + signer_len)
    if pos + _CLOCK_FW.size > size:
        raise SessionKeyCertifyMalformedError("truncated clockInfo")
    pos += _CLOCK_FW.size
    name, pos = tpm2b(_MAX_NAME, "certified name", pos)
    qualified, pos = tpm2b(_MAX_NAME, "qualifiedName", pos)
    if pos != size:
        raise SessionKeyCertifyMalformedError(f"{size - pos} trailing bytes")
    return Certify(raw=data, magic=magic, type=st, qualified_signer=signer, extra_data=extra,
                   name=name, qualified_name=qualified)


def verify_session_key(
    public: bytes,
    certify: bytes,
    signature: bytes,
    *,
    ak: quote.AkPublic,
    nonce: bytes,
    policy: quote.QuotePolicy,
) -> SessionKey:
    """Run checks 1-6 (module docstring) and return the verified key or raise the first
    failure's typed error."""
    # 1. The key itself.
    key = parse_session_key(public)
    # 2. The certify structure.
    attest = parse_certify(certify)
    if attest.magic != quote.TPM_GENERATED_VALUE:
        raise SessionKeyCertifyMagicInvalidError(
            f"magic {attest.magic:#010x} is not TPM_GENERATED_VALUE")
    # 3. Signed by the AK, algorithms pinned.  verify_signature reads only ``raw`` of the
    #    structure it is given, so the certify is passed in a Quote shell.
    try:
        parsed_sig = quote.parse_signature(signature)
    except SandboxSecError as exc:
        raise SessionKeyCertifyMalformedError(f"certify signature: {exc.message}") from None
    shell = quote.Quote(raw=attest.raw, magic=attest.magic, type=attest.type,
                        qualified_signer=attest.qualified_signer, extra_data=attest.extra_data,
                        clock=quote.ClockInfo(0, 0, 0, False), firmware_version=0,
                        selections=(), pcr_digest=b"")
    try:
        quote.verify_signature(shell, parsed_sig, ak, policy)
    except QuoteSignatureInvalidError:
        raise SessionKeyCertifySignatureInvalidError(
            "the certify does not verify under the attesting AK") from None
    except SandboxSecError as exc:
        raise SessionKeyAlgorithmRefusedError(f"certify: {exc.message}") from None
    # 5. Fresh: made for this attestation's nonce.
    if not hmac.compare_digest(attest.extra_data, nonce):
        raise SessionKeyCertifyNonceMismatchError("the certify's extraData is not the nonce")
    # 6. It certifies exactly the key that was sent.
    if not hmac.compare_digest(attest.name, key.name):
        raise SessionKeyCertifyNameMismatchError(
            "the certified name is not the name of the session key sent")
    return key
