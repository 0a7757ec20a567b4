"""A software stand-in for a TPM's quoting, for fast unit tests and the benchmark.

It marshals TPMS_ATTEST / TPMT_SIGNATURE / TPM2B_PUBLIC exactly as a TPM does (the swtpm
integration tests check the real thing) and signs with a ``cryptography`` key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from tpm2_pytss.types import TPM2B_PUBLIC, TPMA_OBJECT

from sandboxsec.attestation.akbind import kdfa, kdfe
from sandboxsec.attestation.eventlog import EventLogBuilder

if TYPE_CHECKING:
    from tests.support.pki import Publisher

HASH_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C}
_CRYPTO = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384()}
AK_ATTRS = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
IMAGE_DIGEST = "sha256:" + hashlib.sha256(b"test image").hexdigest()


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass
class SoftAk:
    """An ECDSA P-256 AK: its private key and its TPM2B_PUBLIC."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    attributes: int = int(AK_ATTRS)

    @cached_property
    def public(self) -> bytes:
        nums = self.key.public_key().public_numbers()
        pub = TPM2B_PUBLIC.parse("ecc256:null:null", objectAttributes=self.attributes)
        pub.publicArea.unique.ecc.x = nums.x.to_bytes(32, "big")
        pub.publicArea.unique.ecc.y = nums.y.to_bytes(32, "big")
        data: bytes = pub.marshal()
        return data

    @property
    def name(self) -> bytes:
        return b"\x00\x0b" + hashlib.sha256(self.public[2:]).digest()


def soft_activate(
    ek_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ak_name: bytes,
    credential_blob: bytes,
    encrypted_secret: bytes,
    *,
    name_alg: str = "sha256",
    sym_bits: int = 128,
) -> bytes:
    """TPM2_ActivateCredential in software: what a TPM holding ``ek_key`` would return."""
    algorithm = _CRYPTO[name_alg]
    secret = encrypted_secret[2:]
    if isinstance(ek_key, rsa.RSAPrivateKey):
        seed = ek_key.decrypt(
            secret,
            padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=b"IDENTITY\x00"),
        )
    else:
        xs = int.from_bytes(secret[:2], "big")
        x = secret[2 : 2 + xs]
        y = secret[4 + xs :]
        point = ec.EllipticCurvePublicKey.from_encoded_point(ek_key.curve, b"\x04" + x + y)
        z = ek_key.exchange(ec.ECDH(), point)
        own_x = ek_key.public_key().public_numbers().x.to_bytes(len(x), "big")
        seed = kdfe(name_alg, z, b"IDENTITY", x, own_x, algorithm.digest_size * 8)
    blob = credential_blob[2:]
    hsize = int.from_bytes(blob[:2], "big")
    outer, enc_identity = blob[2 : 2 + hsize], blob[2 + hsize :]
    hmac_key = kdfa(name_alg, seed, b"INTEGRITY", b"", b"", algorithm.digest_size * 8)
    if not hmac.compare_digest(
        hmac.new(hmac_key, enc_identity + ak_name, name_alg).digest(), outer
    ):
        raise ValueError("integrity check failed (wrong AK name or EK)")
    sym_key = kdfa(name_alg, seed, b"STORAGE", ak_name, b"", sym_bits)
    plain = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor().update(enc_identity)
    return plain[2 : 2 + int.from_bytes(plain[:2], "big")]


def marshal_quote(
    nonce: bytes,
    pcrs: Mapping[str, Mapping[int, bytes]],
    *,
    hash_alg: str = "sha256",
    magic: int = 0xFF544347,
    st: int = 0x8018,
    clock: int = 1000,
    reset: int = 1,
    restart: int = 0,
    safe: bool = True,
    signer: bytes = b"\x00\x0b" + bytes(32),
) -> bytes:
    """A TPMS_ATTEST quote over ``pcrs`` in bank then ascending index order."""
    parts = [struct.pack(">IH", magic, st), tpm2b(signer), tpm2b(nonce)]
    parts.append(struct.pack(">QIIB", clock, reset, restart, 1 if safe else 0))
    parts.append(struct.pack(">Q", 0x2019102300000000))
    parts.append(struct.pack(">I", len(pcrs)))
    h = hashlib.new(hash_alg)
    for bank, values in pcrs.items():
        bitmap = bytearray(3)
        for i in values:
            bitmap[i // 8] |= 1 << (i % 8)
        parts.append(struct.pack(">HB", HASH_IDS[bank], 3) + bytes(bitmap))
        for i in sorted(values):
            h.update(values[i])
    parts.append(tpm2b(h.digest()))
    return b"".join(parts)


def sign_quote(ak: SoftAk, quote: bytes, *, hash_alg: str = "sha256") -> bytes:
    """TPMT_SIGNATURE (ECDSA) over ``quote``."""
    der = ak.key.sign(quote, ec.ECDSA(_CRYPTO[hash_alg]))
    r, s = decode_dss_signature(der)
    return (
        struct.pack(">HH", 0x0018, HASH_IDS[hash_alg])
        + tpm2b(r.to_bytes(32, "big"))
        + tpm2b(s.to_bytes(32, "big"))
    )


def boot_log(events: int = 8) -> tuple[bytes, dict[int, bytes], dict[int, list[bytes]]]:
    """A measured boot: ``events`` events over PCRs 0-7; the log, final PCRs, digests per PCR."""
    builder = EventLogBuilder(("sha256",))
    pcrs = {i: bytes(32) for i in range(8)}
    digests: dict[int, list[bytes]] = {}
    kinds = [0x80000008, 0x80000001, 0x80000003, 0x0000000D, 0x80000002, 0x80000007]
    for n in range(events):
        pcr = n % 8
        event_type = 0x4 if n >= events - 8 else kinds[n % len(kinds)]
        d = builder.add(pcr, event_type, f"event {n}".encode())["sha256"]
        pcrs[pcr] = hashlib.sha256(pcrs[pcr] + d).digest()
        digests.setdefault(pcr, []).append(d)
    return builder.to_bytes(), pcrs, digests


def make_manifest(
    publisher: Publisher,
    pcrs: Mapping[int, bytes],
    *,
    event_digests: Mapping[int, tuple[bytes, ...]] | None = None,
    expires_at: datetime | None = None,
    image_digest: str = IMAGE_DIGEST,
    banks: Mapping[str, Mapping[int, bytes]] | None = None,
) -> bytes:
    """A signed manifest pinning ``pcrs`` (SHA-256), or the values of ``banks`` when given."""
    # Imported here so the quote and event-log tests do not depend on the image module.
    from sandboxsec.attestation.image import ReferenceValues, sign_manifest

    return sign_manifest(
        image_name="registry.example/sandbox:1.0",
        image_digest=image_digest,
        version="1.0",
        expires_at=expires_at or datetime(2027, 6, 1, tzinfo=UTC),
        reference=ReferenceValues(
            pcrs={b: dict(v) for b, v in banks.items()} if banks else {"sha256": dict(pcrs)},
            event_digests=dict(event_digests or {}),
        ),
        key=publisher.leaf.key,  # type: ignore[arg-type]
        cert_chain=publisher.chain,
        issued_at=datetime(2026, 1, 1, tzinfo=UTC) - timedelta(days=1),
    )


__all__ = [
    "IMAGE_DIGEST",
    "SoftAk",
    "boot_log",
    "make_manifest",
    "marshal_quote",
    "sign_quote",
    "soft_activate",
    "tpm2b",
]


def soft_session_key_public(x: bytes, y: bytes) -> bytes:
    """A TPM2B_PUBLIC claiming TPM attributes for a software P-256 key (test machines only:
    a real TPM refuses to certify such a key, see tests/integration/sessions)."""
    from tpm2_pytss.constants import TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC

    attrs = (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
    pub = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)
    pub.publicArea.unique.ecc.x = x
    pub.publicArea.unique.ecc.y = y
    data: bytes = pub.marshal()
    return data


def marshal_certify(nonce: bytes, certified_public: bytes, *, magic: int = 0xFF544347,
                    st: int = 0x8017, signer: bytes = b"\x00\x0b" + bytes(32)) -> bytes:
    """A TPMS_ATTEST of TPM2_Certify over the key whose TPM2B_PUBLIC is given."""
    name = b"\x00\x0b" + hashlib.sha256(certified_public[2:]).digest()
    return b"".join([
        struct.pack(">IH", magic, st), tpm2b(signer), tpm2b(nonce),
        struct.pack(">QIIB", 1000, 1, 0, 1), struct.pack(">Q", 0x2019102300000000),
        tpm2b(name), tpm2b(name),
    ])


def soft_session_evidence(ak: SoftAk, nonce: bytes) -> tuple[dict[str, str], Any]:
    """Evidence fields of a fresh software session key certified by ``ak`` over ``nonce``;
    the key is registered for test proofs (:mod:`tests.support.sessionkeys`) and returned too."""
    import base64

    from tests.support.sessionkeys import register

    key = register()
    n = key.private.public_key().public_numbers()
    public = soft_session_key_public(n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big"))
    certify = marshal_certify(nonce, public)
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return {"session_key": enc(public), "session_key_certify": enc(certify),
            "session_key_signature": enc(sign_quote(ak, certify))}, key
