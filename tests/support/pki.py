"""A throwaway PKI for tests: CAs, intermediates, leaves and CRLs built with ``cryptography``.

Shared by the image-signing and the TPM tests.  Everything is generated fresh in memory; no
key ever touches the repository.  Times are relative to :data:`NOW`, the default instant of
:class:`sandboxsec.clock.FixedClock`.

Typical use::

    root = make_ca("Publisher Root CA")
    inter = make_ca("Publisher Issuing CA", issuer=root)
    leaf = make_leaf(inter, "Publisher", key_type="ed25519")
    verify_chain(leaf.der, [inter.der], [root.cert], NOW)

    pub = make_publisher()                  # root -> intermediate -> code-signing leaf
    pub.trust()                             # TrustStore with pub.root as the only root
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandboxsec.attestation.image import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ReferenceValues,
    pae,
)
from sandboxsec.attestation.trust import Revocations, TrustStore

__all__ = [
    "NOW",
    "Issued",
    "KeyType",
    "Publisher",
    "make_ca",
    "make_crl",
    "make_leaf",
    "make_publisher",
    "new_key",
    "sample_reference",
    "sign_raw",
    "statement_dict",
]

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)

KeyType = Literal["p256", "p384", "ed25519", "rsa2048", "rsa1024"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

CA_USAGE = ("key_cert_sign", "crl_sign")
_KU_FIELDS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
)


def new_key(key_type: KeyType = "p256") -> PrivateKey:
    """A fresh private key of the given type."""
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa2048":
        return _rsa(2048)
    if key_type == "rsa1024":
        return _rsa(1024)
    raise ValueError(key_type)


@cache
def _rsa(bits: int) -> rsa.RSAPrivateKey:
    # RSA generation is slow; one key per size is enough for tests that only need "an RSA key".
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


def _hash_for(
    key: PrivateKey, hash_alg: hashes.HashAlgorithm | None
) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    return hash_alg or hashes.SHA256()


def _issue(
    subject_cn: str,
    public_key: object,
    signer: Issued | None,
    signer_key: PrivateKey,
    *,
    ca: bool | None,
    path_length: int | None,
    key_usage: Sequence[str] | None,
    eku: Sequence[x509.ObjectIdentifier] | None,
    not_before: datetime,
    not_after: datetime,
    serial: int | None,
    hash_alg: hashes.HashAlgorithm | None,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]],
    issuer_name: x509.Name | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    issuer = issuer_name or (signer.cert.subject if signer else subject)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if key_usage is not None:
        flags = {name: name in key_usage for name in _KU_FIELDS}
        builder = builder.add_extension(
            x509.KeyUsage(**flags, encipher_only=False, decipher_only=False), critical=True
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
        critical=False,
    )
    for ext, critical in extra_extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer_key, _hash_for(signer_key, hash_alg))  # type: ignore[arg-type]


def make_ca(
    cn: str = "Test Publisher Root CA",
    *,
    issuer: Issued | None = None,
    key_type: KeyType = "p256",
    key: PrivateKey | None = None,
    path_length: int | None = None,
    ca: bool | None = True,
    key_usage: Sequence[str] | None = CA_USAGE,
    not_before: datetime = NOW - 365 * DAY,
    not_after: datetime = NOW + 3650 * DAY,
    serial: int | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> Issued:
    """A CA certificate: self-signed root when ``issuer`` is None, else an intermediate."""
    key = key or new_key(key_type)
    cert = _issue(
        cn,
        key.public_key(),
        issuer,
        issuer.key if issuer else key,
        ca=ca,
        path_length=path_length,
        key_usage=key_usage,
        eku=None,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        hash_alg=hash_alg,
        extra_extensions=extra_extensions,
        issuer_name=None,
    )
    return Issued(cert, key)


def make_leaf(
    issuer: Issued,
    cn: str = "Test Image Publisher",
    *,
    key_type: KeyType = "p256",
    key: PrivateKey | None = None,
    key_usage: Sequence[str] | None = ("digital_signature",),
    eku: Sequence[x509.ObjectIdentifier] | None = (ExtendedKeyUsageOID.CODE_SIGNING,),
    ca: bool | None = False,
    not_before: datetime = NOW - 30 * DAY,
    not_after: datetime = NOW + 365 * DAY,
    serial: int | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    extra_extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    signer_key: PrivateKey | None = None,
    issuer_name: x509.Name | None = None,
    public_key: object | None = None,
) -> Issued:
    """An end-entity certificate (code signing by default) issued by ``issuer``.

    ``signer_key`` signs with a key other than the issuer's (a forged issuer signature);
    ``issuer_name`` overrides the issuer name written into the certificate; ``public_key``
    certifies a key held elsewhere (a real TPM's EK), and the returned key is then unrelated.
    """
    key = key or new_key(key_type)
    cert = _issue(
        cn,
        public_key if public_key is not None else key.public_key(),
        issuer,
        signer_key or issuer.key,
        ca=ca,
        path_length=None,
        key_usage=key_usage,
        eku=eku,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
        hash_alg=hash_alg,
        extra_extensions=extra_extensions,
        issuer_name=issuer_name,
    )
    return Issued(cert, key)


def make_crl(
    issuer: Issued,
    revoked_serials: Iterable[int],
    *,
    this_update: datetime = NOW - DAY,
    next_update: datetime = NOW + 7 * DAY,
    signer_key: PrivateKey | None = None,
    hash_alg: hashes.HashAlgorithm | None = None,
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
) -> x509.CertificateRevocationList:
    """A CRL by ``issuer`` (or signed by ``signer_key``, to forge one) revoking the serials,
    with ``extensions`` (an issuingDistributionPoint, say) and ``hash_alg`` when given."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(this_update)
        .next_update(next_update)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(this_update)
            .build()
        )
    key = signer_key or issuer.key
    return builder.sign(key, _hash_for(key, hash_alg))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Publisher:
    """An image publisher: root CA, optional issuing CA, code-signing leaf."""

    root: Issued
    leaf: Issued
    intermediates: tuple[Issued, ...] = field(default=())

    @property
    def chain(self) -> list[x509.Certificate]:
        """Leaf first, then intermediates: what ``sign_manifest`` wants."""
        return [self.leaf.cert, *(i.cert for i in self.intermediates)]

    def trust(self, revocations: Revocations | None = None) -> TrustStore:
        store = TrustStore(roots=(self.root.cert,))
        return store.with_revocations(revocations) if revocations else store


def make_publisher(
    key_type: KeyType = "p256",
    *,
    with_intermediate: bool = True,
    ca_key_type: KeyType = "p256",
    **leaf_kwargs: object,
) -> Publisher:
    """A fresh publisher PKI; ``leaf_kwargs`` go to :func:`make_leaf`."""
    root = make_ca("Test Publisher Root CA", key_type=ca_key_type)
    inters: tuple[Issued, ...] = ()
    issuer = root
    if with_intermediate:
        issuer = make_ca("Test Publisher Issuing CA", issuer=root, key_type=ca_key_type)
        inters = (issuer,)
    leaf = make_leaf(issuer, key_type=key_type, **leaf_kwargs)  # type: ignore[arg-type]
    return Publisher(root=root, leaf=leaf, intermediates=inters)


# -- image manifests ---------------------------------------------------------------------------


def sample_reference() -> ReferenceValues:
    """Reference values of a small measured boot: two sha256 PCRs, one event digest."""
    return ReferenceValues(
        pcrs={
            "sha256": {
                0: hashlib.sha256(b"firmware").digest(),
                4: hashlib.sha256(b"kernel").digest(),
            }
        },
        event_digests={4: (hashlib.sha256(b"kernel event").digest(),)},
    )


def sign_raw(
    payload: bytes,
    signer: Issued,
    chain: Sequence[x509.Certificate],
    *,
    payload_type: str = PAYLOAD_TYPE,
    ecdsa_hash: hashes.HashAlgorithm | None = None,
) -> bytes:
    """A DSSE envelope over arbitrary ``payload`` bytes, signed however the test needs.

    Unlike ``sign_manifest`` this checks nothing, so tests can sign statements and key types
    the verifier must refuse.
    """
    message = pae(payload_type, payload)
    key = signer.key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(message)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(message, ec.ECDSA(ecdsa_hash or hashes.SHA256()))
    else:
        sig = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": "",
                "sig": base64.b64encode(sig).decode(),
                "certificates": [
                    base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                    for c in chain
                ],
            }
        ],
    }
    return json.dumps(envelope).encode()


def statement_dict(
    *,
    name: str = "images/sandbox.qcow2",
    digest_hex: str = "ab" * 32,
    expires_at: str = "2026-06-01T00:00:00Z",
    **predicate_overrides: object,
) -> dict[str, object]:
    """A valid statement as a dict, for tests that break one field of it."""
    predicate: dict[str, object] = {
        "version": "1.0.0",
        "issued_at": "2025-12-01T00:00:00Z",
        "expires_at": expires_at,
        **sample_reference().to_json(),
    }
    predicate.update(predicate_overrides)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest_hex}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
