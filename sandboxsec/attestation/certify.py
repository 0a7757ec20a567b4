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

TPM_ST_ATTEST_CERTIFY: Final = quote.TPM_ST_ATTEST_CERTIFY
#: What a session key must carry.
SESSION_KEY_REQUIRED: Final = (quote.TPMA_FIXED_TPM | quote.TPMA_FIXED_PARENT
                               | quote.TPMA_SENSITIVE_DATA_ORIGIN | quote.TPMA_SIGN)


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
        ecc = key_type == quote.ALG_ECC
        curve = int(area.parameters.eccDetail.curveID) if ecc else 0
        scheme = int(area.parameters.eccDetail.scheme.scheme) if ecc else 0
        scheme_hash = (int(area.parameters.eccDetail.scheme.details.ecdsa.hashAlg)
                       if scheme == quote.ALG_ECDSA else 0)
        x = bytes(area.unique.ecc.x) if ecc else b""
        y = bytes(area.unique.ecc.y) if ecc else b""
    except Exception as exc:  # the TSS raises TSS2_Exception, cffi TypeError/ValueError
        raise SessionKeyPublicMalformedError(
            f"TPM2B_PUBLIC does not parse: {type(exc).__name__}") from None
    # 1a. Canonical bytes: the name hashes exactly these.
    if used != len(data) or canonical != data[2:]:
        raise SessionKeyPublicMalformedError("TPM2B_PUBLIC is not canonically marshalled")
    # 1b. ECDSA P-256 with SHA-256 only (the proof algorithm is ES256).
    if key_type != quote.ALG_ECC or curve != quote.CURVE_P256:
        raise SessionKeyAlgorithmRefusedError("the session key must be an ECC P-256 key")
    if name_alg != quote.ALG_SHA256:
        raise SessionKeyAlgorithmRefusedError("the session key's name algorithm must be SHA-256")
    if scheme not in (quote.ALG_NULL, quote.ALG_ECDSA) or (
            scheme == quote.ALG_ECDSA and scheme_hash != quote.ALG_SHA256):
        raise SessionKeyAlgorithmRefusedError("the session key's scheme must be ECDSA-SHA256")
    # 1c. Non-duplicable, made inside the TPM, an unrestricted signing key.
    if attributes & SESSION_KEY_REQUIRED != SESSION_KEY_REQUIRED:
        raise SessionKeyAttributesInvalidError(
            f"attributes {attributes:#010x} lack fixedTPM, fixedParent, sensitiveDataOrigin "
            "or sign")
    if attributes & (quote.TPMA_RESTRICTED | quote.TPMA_DECRYPT):
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
    name = quote.ALG_SHA256.to_bytes(2, "big") + hashlib.sha256(canonical).digest()
    return SessionKey(name=name, jwk=jwk, jkt=jwk_thumbprint(jwk), attributes=attributes)


def parse_certify(data: bytes) -> Certify:
    """Parse a marshalled TPMS_ATTEST of type TPM_ST_ATTEST_CERTIFY (magic not yet checked).

    Raises :class:`SessionKeyCertifyMalformedError` (including trailing bytes) or
    :class:`SessionKeyCertifyTypeInvalidError`.
    """
    # The common header is the quote parser's; then TPMS_CERTIFY_INFO: two TPM2B_NAMEs.
    head, pos = quote.parse_attest_header(
        data, TPM_ST_ATTEST_CERTIFY, malformed=SessionKeyCertifyMalformedError,
        wrong_type=SessionKeyCertifyTypeInvalidError)
    name, pos = _name(data, pos, "certified name")
    qualified, pos = _name(data, pos, "qualifiedName")
    if pos != len(data):
        raise SessionKeyCertifyMalformedError(f"{len(data) - pos} trailing bytes")
    return Certify(raw=data, magic=head.magic, type=head.type,
                   qualified_signer=head.qualified_signer, extra_data=head.extra_data,
                   name=name, qualified_name=qualified)


def _name(data: bytes, start: int, what: str) -> tuple[bytes, int]:
    # One TPM2B_NAME at ``start``; returns it and the offset after it.
    if start + 2 > len(data):
        raise SessionKeyCertifyMalformedError(f"truncated {what}")
    length = int.from_bytes(data[start:start + 2], "big")
    if length > quote.MAX_NAME or start + 2 + length > len(data):
        raise SessionKeyCertifyMalformedError(f"{what} is {length} bytes, over its limit "
                                              "or past the end")
    return data[start + 2:start + 2 + length], start + 2 + length


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
    # 3. Signed by the AK, algorithms pinned (the quote's check, over the certify's bytes).
    try:
        parsed_sig = quote.parse_signature(signature)
    except SandboxSecError as exc:
        raise SessionKeyCertifyMalformedError(f"certify signature: {exc.message}") from None
    try:
        quote.verify_attest_signature(attest.raw, parsed_sig, ak, policy)
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
