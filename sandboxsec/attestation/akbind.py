"""Binding an attestation key to a certified endorsement key (TPM2_MakeCredential in Python).

The verifier encrypts a random secret so that only the TPM that holds the EK's private key,
and has the AK with exactly the given name loaded, can recover it with
``TPM2_ActivateCredential``.  A sandbox that returns the secret has proved its AK lives in
the same TPM as the certified EK.

This follows TPM 2.0 Part 1, "Credential Protection" and "Protected Storage":

1. ``seed`` — RSA EK: random bytes of the name-algorithm size, encrypted with RSA-OAEP
   (label ``"IDENTITY\\0"``); ECC EK: an ephemeral ECDH with the EK,
   ``seed = KDFe(nameAlg, Z, "IDENTITY", ephemeral.x, ek.x)``.
2. ``symKey = KDFa(nameAlg, seed, "STORAGE", AK name, "", EK symmetric key bits)``.
3. ``encIdentity = AES-CFB(symKey, IV=0, TPM2B_DIGEST(credential))``.
4. ``hmacKey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)``;
   ``outerHMAC = HMAC(hmacKey, encIdentity || AK name)``.
5. ``credentialBlob = TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity)``.

Contract: pure functions over bytes and pyca key objects; only ``make_credential`` draws
randomness (the seed, from ``secrets``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from sandboxsec.attestation.errors import (
    AkActivationFailedError,
    EkCertificateKeyMismatchError,
    EkPublicUnsupportedError,
)

__all__ = [
    "Credential",
    "EkProfile",
    "check_activation",
    "ek_profile",
    "kdfa",
    "kdfe",
    "make_credential",
    "protect_credential",
]

_HASHES: Final = {
    "sha256": (hashes.SHA256(), 32, 0x000B),
    "sha384": (hashes.SHA384(), 48, 0x000C),
}
_CURVE_IDS: Final = {"secp256r1": 0x0003, "secp384r1": 0x0004}


@dataclass(frozen=True, slots=True)
class EkProfile:
    """The EK parameters credential protection needs: its key, name and symmetric algs."""

    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    name_alg: str
    sym_bits: int  # AES key size of the EK's symmetric definition


@dataclass(frozen=True, slots=True)
class Credential:
    """The two TPM2B structures the sandbox passes to ActivateCredential."""

    credential_blob: bytes  # marshalled TPM2B_ID_OBJECT
    encrypted_secret: bytes  # marshalled TPM2B_ENCRYPTED_SECRET


def kdfa(
    hash_alg: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa of TPM 2.0 Part 1 (SP 800-108 counter mode with HMAC); ``label`` without NUL.

    cryptography's ``KBKDFHMAC`` with a 32-bit counter before the fixed input and a 32-bit
    length after it builds exactly ``counter || label || 0x00 || contextU || contextV ||
    bits`` (a differential test holds it to tpm2-pytss).  ``bits`` is a multiple of 8 here.
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFa output must be a positive whole number of bytes")
    algorithm, _, _ = _HASHES[hash_alg]
    return KBKDFHMAC(
        algorithm=algorithm, mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
        location=CounterLocation.BeforeFixed, label=label, context=context_u + context_v,
        fixed=None,
    ).derive(key)


def kdfe(hash_alg: str, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe of TPM 2.0 Part 1 (SP 800-56A concatenation KDF); ``label`` without NUL.

    cryptography's ``ConcatKDFHash`` computes ``H(counter || Z || otherInfo)`` with
    ``otherInfo = label || 0x00 || partyU || partyV``.
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFe output must be a positive whole number of bytes")
    algorithm, _, _ = _HASHES[hash_alg]
    return ConcatKDFHash(
        algorithm=algorithm, length=bits // 8, otherinfo=label + b"\x00" + party_u + party_v
    ).derive(z)


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def ek_profile(ek_certificate: x509.Certificate, ek_public: bytes | None = None) -> EkProfile:
    """The EK's credential-protection parameters, from its certificate (and public area).

    Without ``ek_public`` the TCG default templates are assumed: RSA 2048 and ECC P-256 use
    SHA-256 with AES-128, ECC P-384 uses SHA-384 with AES-256.  With ``ek_public`` (a
    TPM2B_PUBLIC) its name algorithm and symmetric key size are used, after checking it holds
    the certificate's key.
    """
    key = ek_certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise EkPublicUnsupportedError(f"RSA EK of {key.key_size} bits is too small")
        name_alg, sym_bits = "sha256", 128
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name == "secp256r1":
            name_alg, sym_bits = "sha256", 128
        elif key.curve.name == "secp384r1":
            name_alg, sym_bits = "sha384", 256
        else:
            raise EkPublicUnsupportedError(f"EK curve {key.curve.name} is not supported")
    else:
        raise EkPublicUnsupportedError("the EK is neither RSA nor ECC")
    if ek_public is not None:
        name_alg, sym_bits = _profile_from_public(ek_public, key)
    return EkProfile(key=key, name_alg=name_alg, sym_bits=sym_bits)


def _profile_from_public(
    data: bytes, cert_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
) -> tuple[str, int]:
    from tpm2_pytss.types import TPM2B_PUBLIC

    try:
        pub, used = TPM2B_PUBLIC.unmarshal(data)
        area = pub.publicArea
        name_alg = {0x000B: "sha256", 0x000C: "sha384"}.get(int(area.nameAlg))
        if int(area.type) == 0x0001:
            sym = area.parameters.rsaDetail.symmetric
            same = isinstance(cert_key, rsa.RSAPublicKey) and cert_key.public_numbers().n == (
                int.from_bytes(bytes(area.unique.rsa), "big")
            )
        elif int(area.type) == 0x0023:
            sym = area.parameters.eccDetail.symmetric
            point = b"\x04" + bytes(area.unique.ecc.x) + bytes(area.unique.ecc.y)
            same = isinstance(cert_key, ec.EllipticCurvePublicKey) and point == (
                cert_key.public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
            )
        else:
            raise EkPublicUnsupportedError("the EK public area is neither RSA nor ECC")
        sym_alg, sym_bits = int(sym.algorithm), int(sym.keyBits.aes)
    except (EkPublicUnsupportedError, EkCertificateKeyMismatchError):
        raise
    except Exception:  # TSS2_Exception or cffi errors on hostile bytes
        raise EkPublicUnsupportedError("the EK public area does not parse") from None
    if used != len(data):
        raise EkPublicUnsupportedError("trailing bytes after the EK public area")
    if not same:
        raise EkCertificateKeyMismatchError("the EK public area does not hold the certified key")
    if name_alg is None or sym_alg != 0x0006 or sym_bits not in (128, 256):  # TPM_ALG_AES
        raise EkPublicUnsupportedError("the EK must use SHA-256/384 and AES-128/256")
    return name_alg, sym_bits


def _seed_rsa(key: rsa.RSAPublicKey, name_alg: str) -> tuple[bytes, bytes]:
    algorithm, size, _ = _HASHES[name_alg]
    seed = secrets.token_bytes(size)
    encrypted = key.encrypt(
        seed,
        padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=b"IDENTITY\x00"),
    )
    return seed, encrypted


def _seed_ecc(key: ec.EllipticCurvePublicKey, name_alg: str) -> tuple[bytes, bytes]:
    _, size, _ = _HASHES[name_alg]
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)  # the x coordinate of the shared point
    coord = (key.curve.key_size + 7) // 8
    mine = ephemeral.public_key().public_numbers()
    theirs = key.public_numbers()
    ephem_x = mine.x.to_bytes(coord, "big")
    ephem_y = mine.y.to_bytes(coord, "big")
    seed = kdfe(name_alg, z, b"IDENTITY", ephem_x, theirs.x.to_bytes(coord, "big"), size * 8)
    # TPMS_ECC_POINT: two TPM2B_ECC_PARAMETERs.
    return seed, _tpm2b(ephem_x) + _tpm2b(ephem_y)


def make_credential(profile: EkProfile, ak_name: bytes, credential: bytes) -> Credential:
    """Protect ``credential`` (at most the name-algorithm size) for the EK and AK name."""
    _, size, _ = _HASHES[profile.name_alg]
    if not 1 <= len(credential) <= size:
        raise ValueError(f"credential must be 1..{size} bytes")
    # 1. The seed, readable only with the EK's private key.
    if isinstance(profile.key, rsa.RSAPublicKey):
        seed, encrypted_seed = _seed_rsa(profile.key, profile.name_alg)
    else:
        seed, encrypted_seed = _seed_ecc(profile.key, profile.name_alg)
    return protect_credential(profile, ak_name, credential, seed, encrypted_seed)


def protect_credential(
    profile: EkProfile, ak_name: bytes, credential: bytes, seed: bytes, encrypted_seed: bytes
) -> Credential:
    """Steps 2-5 of :func:`make_credential` for a given seed (deterministic, for testing)."""
    algorithm, size, _ = _HASHES[profile.name_alg]
    if not 1 <= len(credential) <= size:
        raise ValueError(f"credential must be 1..{size} bytes")
    # 2-3. Encrypt the credential under a key bound to the AK's name.
    sym_key = kdfa(profile.name_alg, seed, b"STORAGE", ak_name, b"", profile.sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_tpm2b(credential)) + encryptor.finalize()
    # 4. The outer HMAC binds the ciphertext to the AK name as well.
    hmac_key = kdfa(profile.name_alg, seed, b"INTEGRITY", b"", b"", size * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, algorithm.name).digest()
    # 5. Marshal what ActivateCredential takes.
    blob = _tpm2b(outer) + enc_identity
    return Credential(credential_blob=_tpm2b(blob), encrypted_secret=_tpm2b(encrypted_seed))


def check_activation(expected_digest: bytes, returned: bytes) -> None:
    """The secret the sandbox returned hashes (SHA-256) to the stored digest."""
    if not hmac.compare_digest(hashlib.sha256(returned).digest(), expected_digest):
        raise AkActivationFailedError("the returned secret does not match the credential")
