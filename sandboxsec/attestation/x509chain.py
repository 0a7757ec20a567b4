"""X.509 chain building and verification against configured trust roots.

One verifier for every chain this project checks: image publisher certificates and TPM
endorsement key (EK) certificates.  It is deliberately small and explicit instead of a general
RFC 5280 engine, so each refusal names the certificate that failed and the reason:

* the input is strict DER, at most ``max_intermediates`` extra certificates;
* a path is built from the leaf through the supplied intermediates (in any order) to a trust
  root, checking every signature on the way;
* every certificate on the path must use an allowed algorithm, be inside its validity window at
  ``now`` and not be revoked (by serial, by SHA-256 fingerprint, or by a CRL of its issuer);
* every issuer must be a CA (basicConstraints CA, keyCertSign) within its path length;
* no certificate may carry a critical extension this module does not process;
* the leaf must carry the key usages the caller requires and, if the caller names an extended
  key usage, must allow it when the EKU extension is present (or always, with ``eku_required``).

The functions are pure: no clock, no files.  The caller passes ``now``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, SignatureAlgorithmOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from sandboxsec.attestation.image_errors import (
    CertificateAlgorithmError,
    CertificateChainError,
    CertificateChainTooLongError,
    CertificateCrlAlgorithmError,
    CertificateCrlInvalidError,
    CertificateCrlIssuerError,
    CertificateCrlNotCurrentError,
    CertificateCrlScopeError,
    CertificateEkuError,
    CertificateExpiredError,
    CertificateKeyUsageError,
    CertificateMalformedError,
    CertificateNotCaError,
    CertificateNotYetValidError,
    CertificatePathInvalidError,
    CertificatePathLengthError,
    CertificateRef,
    CertificateRevokedError,
    CertificateSignatureError,
    CertificateUnknownCriticalExtensionError,
    CertificateUntrustedIssuerError,
)

__all__ = [
    "CODE_SIGNING",
    "DIGITAL_SIGNATURE",
    "TCG_EK_CERTIFICATE",
    "KeyUsageName",
    "VerifiedChain",
    "certificate_fingerprint",
    "check_crl",
    "describe",
    "load_certificate",
    "load_pem_certificates",
    "verify_chain",
]

KeyUsageName = Literal[
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
]

#: The default leaf key usage: the leaf signs.
DIGITAL_SIGNATURE: Final[tuple[KeyUsageName, ...]] = ("digital_signature",)

#: id-kp-codeSigning, the extended key usage of image publisher certificates.
CODE_SIGNING: Final = ExtendedKeyUsageOID.CODE_SIGNING
#: tcg-kp-EKCertificate (TCG EK Credential Profile), the EKU of TPM endorsement key certificates.
TCG_EK_CERTIFICATE: Final = x509.ObjectIdentifier("2.23.133.8.1")

#: Largest certificate accepted; real publisher and EK certificates are a few KiB.
MAX_CERTIFICATE_BYTES: Final = 64 * 1024

# Extensions whose semantics this module either enforces or may safely ignore even when marked
# critical (subjectAltName is critical on TPM EK certificates, whose subject is empty).
_PROCESSED_EXTENSIONS: Final = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)

_ALLOWED_HASHES: Final = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_EDDSA_SIGNATURES: Final = frozenset({SignatureAlgorithmOID.ED25519, SignatureAlgorithmOID.ED448})
_ALLOWED_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS: Final = 2048


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """A chain that verified at one instant.

    ``path`` runs from the leaf to the trust root (a root that is itself the leaf appears once).
    ``valid_from``/``valid_until`` bound the instants at which the same path would still pass
    the validity checks, so a caller may cache the result for that window (revocation lists
    and trust roots must then be part of the cache key).
    """

    leaf: x509.Certificate
    path: tuple[x509.Certificate, ...]
    subject: str
    fingerprint: str
    root_subject: str
    valid_from: datetime
    valid_until: datetime

    @property
    def root(self) -> x509.Certificate:
        return self.path[-1]


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (the revocation list's fingerprint)."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def describe(cert: x509.Certificate, position: str) -> CertificateRef:
    """The reference an error carries for ``cert`` at ``position``."""
    return CertificateRef(position=position, subject=_subject(cert), serial=cert.serial_number)


def load_certificate(der: bytes, *, position: str = "certificate") -> x509.Certificate:
    """Parse one certificate, accepting only strict DER with nothing after it.

    Raises :class:`CertificateMalformedError` naming ``position`` otherwise.  Extensions are
    parsed eagerly so a malformed or duplicated extension fails here, not halfway through
    verification.
    """
    ref = CertificateRef(position=position, subject="")
    if not isinstance(der, bytes | bytearray | memoryview):
        raise CertificateMalformedError("not bytes", certificate=ref)
    raw = bytes(der)
    if len(raw) > MAX_CERTIFICATE_BYTES:
        raise CertificateMalformedError(
            f"{len(raw)} bytes exceeds the {MAX_CERTIFICATE_BYTES}-byte limit", certificate=ref
        )
    if _serial_sign(raw) is False:
        # Checked before parsing: the parser only warns about this (and will refuse it in a
        # future release), and a warning is not a verdict.
        raise CertificateMalformedError(
            "serial number is zero or negative (RFC 5280 requires a positive serial)",
            certificate=ref,
        )
    try:
        cert = x509.load_der_x509_certificate(raw)
        # Re-encoding catches trailing bytes and any leniency in the parser: what is verified
        # must be exactly what was sent.
        if cert.public_bytes(serialization.Encoding.DER) != raw:
            raise ValueError("not strict DER (re-encoding differs)")
        # The parser is lazy: touch every field verification reads, so a malformed one fails
        # here as "malformed" rather than later as an unexpected exception.
        _ = cert.extensions
        _ = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
        _ = cert.subject == cert.issuer
        _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number
        _ = cert.signature_algorithm_oid, cert.signature, cert.tbs_certificate_bytes
        # The parser hands back the input bytes as the "re-encoding" and accepts a signature
        # BIT STRING that declares unused bits: either would let one signed certificate take
        # many encodings, each with its own SHA-256, and slip past a fingerprint revocation.
        tag, start, length = _der_header(raw, 0)
        if tag != 0x30 or start + length != len(raw):
            raise ValueError("not exactly one DER SEQUENCE (trailing or missing bytes)")
        if raw[len(raw) - len(cert.signature) - 1] != 0:
            raise ValueError("the signature BIT STRING declares unused bits")
    except CertificateChainError:
        raise
    except Exception as exc:  # the parser raises many types on hostile input
        # (ValueError, InvalidVersion, DuplicateExtension, ...): all of them mean "not a
        # certificate we accept", and none may escape as anything but a reason code.
        raise CertificateMalformedError(
            f"not a strict DER X.509 certificate ({exc})", certificate=ref
        ) from exc
    if cert.version is not x509.Version.v3:
        raise CertificateMalformedError(
            "only X.509 v3 certificates are accepted", certificate=describe(cert, position)
        )
    return cert


def _der_header(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content offset, content length) of the DER element at ``offset``."""
    tag = der[offset]
    first = der[offset + 1]
    if first < 0x80:
        return tag, offset + 2, first
    count = first & 0x7F
    if not 1 <= count <= 4:
        raise IndexError("unsupported length")
    length = int.from_bytes(der[offset + 2 : offset + 2 + count], "big")
    return tag, offset + 2 + count, length


def _serial_sign(der: bytes) -> bool | None:
    """Whether the serialNumber is positive; ``None`` if the bytes are too broken to tell.

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    serialNumber INTEGER, ... } ... }
    """
    try:
        tag, offset, _ = _der_header(der, 0)
        if tag != 0x30:
            return None
        tag, offset, _ = _der_header(der, offset)
        if tag != 0x30:
            return None
        tag, content, length = _der_header(der, offset)
        if tag == 0xA0:
            tag, content, length = _der_header(der, content + length)
        if tag != 0x02 or length == 0:
            return None
        value = der[content : content + length]
        if len(value) != length:
            return None
        return not (value[0] & 0x80) and any(value)
    except IndexError:
        return None


def load_pem_certificates(data: bytes, *, source: str = "PEM data") -> tuple[x509.Certificate, ...]:
    """Every certificate in a PEM bundle, each held to the same strict-DER rule.

    An input with no certificate at all is malformed: an empty trust file must not look like a
    successfully loaded one.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
    except Exception as exc:  # see load_certificate
        raise CertificateMalformedError(
            f"{source}: no parsable PEM certificate ({exc})",
            certificate=CertificateRef(position="certificate", subject=""),
        ) from exc
    return tuple(
        load_certificate(c.public_bytes(serialization.Encoding.DER), position=f"{source} #{i + 1}")
        for i, c in enumerate(certs)
    )


def verify_chain(
    leaf_der: bytes,
    intermediates_der: Sequence[bytes],
    trust_roots: Iterable[x509.Certificate],
    now: datetime,
    *,
    required_key_usage: Collection[KeyUsageName] = DIGITAL_SIGNATURE,
    required_eku: x509.ObjectIdentifier | None = None,
    eku_required: bool = False,
    leaf_may_be_ca: bool = False,
    revoked_serials: Collection[int] = frozenset(),
    revoked_fingerprints: Collection[str] = frozenset(),
    crls: Sequence[x509.CertificateRevocationList] = (),
    max_intermediates: int = 8,
) -> VerifiedChain:
    """Verify ``leaf_der`` up to one of ``trust_roots`` at instant ``now``.

    ``intermediates_der`` may be in any order and may contain unrelated certificates.
    ``revoked_serials`` match any certificate on the path (serials are only unique per issuer,
    so this errs on the side of refusing; prefer fingerprints or CRLs for precision).
    ``revoked_fingerprints`` are lowercase SHA-256 hex of certificate DER.  A CRL applies to
    the certificates its issuer signed; it must verify under that issuer and be current.

    Returns a :class:`VerifiedChain` or raises a :class:`CertificateChainError` subclass whose
    ``certificate`` names the failing certificate.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    roots = tuple(trust_roots)

    # 1. Parse: strict DER, bounded count, so hostile input costs little.
    if len(intermediates_der) > max_intermediates:
        raise CertificateChainTooLongError(
            f"{len(intermediates_der)} intermediate certificates offered, at most "
            f"{max_intermediates} accepted"
        )
    leaf = load_certificate(leaf_der, position="leaf")
    pool = [
        load_certificate(der, position=f"intermediate {i + 1} (as supplied)")
        for i, der in enumerate(intermediates_der)
    ]

    # 2. Build the path leaf -> root, verifying each signature as the link is made.
    path = _build_path(leaf, pool, roots, max_intermediates)
    positions = _positions(path)

    # 3. Keys: no small or exotic keys anywhere on the path (signature hashes were checked
    #    while building it; a root's self-signature proves nothing and is not checked).
    for cert, position in zip(path, positions, strict=True):
        _check_key(cert, position)

    # 4. Revocation: the operator's lists first, then issuer CRLs.
    revoked_fp = {fp.lower() for fp in revoked_fingerprints}
    for cert, position in zip(path, positions, strict=True):
        if cert.serial_number in revoked_serials:
            raise CertificateRevokedError(
                "serial is on the revocation list", certificate=describe(cert, position)
            )
        if certificate_fingerprint(cert) in revoked_fp:
            raise CertificateRevokedError(
                "fingerprint is on the revocation list", certificate=describe(cert, position)
            )
    used_crls: list[x509.CertificateRevocationList] = []
    for i, (cert, position) in enumerate(zip(path[:-1], positions[:-1], strict=True)):
        used_crls.extend(_check_crls(cert, position, path[i + 1], crls, now))

    # 5. Validity windows at `now`, the root included: an expired root is not a root.
    for cert, position in zip(path, positions, strict=True):
        _check_validity(cert, position, now)

    # 6. Extensions every verifier must understand, and CA constraints on every issuer.
    for cert, position in zip(path, positions, strict=True):
        _check_critical_extensions(cert, position)
    for i in range(1, len(path)):
        _check_issuer(path[i], positions[i], intermediates_below=i - 1)

    # 7. What the leaf may be used for.
    _check_leaf_usage(
        leaf,
        is_root=len(path) == 1,
        required_key_usage=required_key_usage,
        required_eku=required_eku,
        eku_required=eku_required,
        leaf_may_be_ca=leaf_may_be_ca,
    )

    # 8. The path validator of record: cryptography's RFC 5280 / Web PKI verifier must agree
    #    (signatures, names, validity, basicConstraints, pathLen, unknown critical
    #    extensions).  The checks above run first so a refusal names the certificate and
    #    reason precisely; a chain either refuses is refused.
    _library_check(path, pool, roots, now, max_intermediates, required_eku)

    return VerifiedChain(
        leaf=leaf,
        path=path,
        subject=_subject(leaf),
        fingerprint=certificate_fingerprint(leaf),
        root_subject=_subject(path[-1]),
        # A CRL bounds the window too: past its nextUpdate the result must be recomputed.
        valid_from=max(
            [c.not_valid_before_utc for c in path] + [c.last_update_utc for c in used_crls]
        ),
        valid_until=min(
            [c.not_valid_after_utc for c in path]
            + [c.next_update_utc for c in used_crls if c.next_update_utc is not None]
        ),
    )


# -- steps -------------------------------------------------------------------------------------


def _build_path(
    leaf: x509.Certificate,
    pool: list[x509.Certificate],
    roots: tuple[x509.Certificate, ...],
    max_intermediates: int,
) -> tuple[x509.Certificate, ...]:
    root_der = {r.public_bytes(serialization.Encoding.DER) for r in roots}
    path: list[x509.Certificate] = [leaf]
    current = leaf
    # A pinned root presented as the leaf is its own path.
    if current.public_bytes(serialization.Encoding.DER) in root_der:
        return (current,)
    for depth in range(max_intermediates + 1):
        position = "leaf" if depth == 0 else f"intermediate {depth}"
        signature_failure: str | None = None
        _check_signature_algorithm(current, position)

        # Prefer a configured root: an intermediate that duplicates a root adds nothing.
        root_name_clash = False
        for root in roots:
            if root.subject != current.issuer:
                continue
            if _issued_by(current, root) is None:
                path.append(root)
                return tuple(path)
            root_name_clash = True

        for candidate in pool:
            if candidate.subject != current.issuer or any(candidate is p for p in path):
                continue
            problem = _issued_by(current, candidate)
            if problem is None:
                path.append(candidate)
                current = candidate
                break
            signature_failure = problem
        else:
            ref = describe(current, position)
            if signature_failure is not None:
                raise CertificateSignatureError(signature_failure, certificate=ref)
            if root_name_clash:
                # A root is its key, not its name: a CA that merely shares the name is untrusted.
                raise CertificateUntrustedIssuerError(
                    f"issuer '{_name(current.issuer)}' has the name of a trust root but the "
                    "root's key did not sign this certificate",
                    certificate=ref,
                )
            raise CertificateUntrustedIssuerError(
                f"issuer '{_name(current.issuer)}' is not a trusted root and no supplied "
                "intermediate has that subject",
                certificate=ref,
            )
    raise CertificateChainTooLongError(
        f"no trust root within {max_intermediates} intermediates",
        certificate=describe(current, f"intermediate {max_intermediates}"),
    )


def _ca_key_usage(_policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
    if ku is not None and not ku.key_cert_sign:
        raise ValueError("keyUsage of a CA lacks keyCertSign")


def _ee_eku(required: x509.ObjectIdentifier | None) -> object:
    def check(_policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        if required is not None and eku is not None and required not in eku:
            raise ValueError(f"extendedKeyUsage lacks {required.dotted_string}")

    return check


def _library_expressible(path: Sequence[x509.Certificate]) -> bool:
    """The library's Web PKI profile forbids EdDSA keys and signatures, which this project
    accepts for publishers: such chains are checked by this module alone (and by the
    differential corpus against OpenSSL)."""
    for cert in path:
        if cert.signature_algorithm_oid in _EDDSA_SIGNATURES and cert is not path[-1]:
            return False
        if isinstance(cert.public_key(), ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return False
    return True


def _library_check(
    path: tuple[x509.Certificate, ...],
    pool: Sequence[x509.Certificate],
    roots: tuple[x509.Certificate, ...],
    now: datetime,
    max_intermediates: int,
    required_eku: x509.ObjectIdentifier | None,
) -> None:
    if len(path) == 1 or not _library_expressible(path):
        return  # a pinned root as its own leaf has no path to validate
    ca_policy = (
        ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    )
    ee_policy = ExtensionPolicy.permit_all().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_eku(required_eku)  # type: ignore[arg-type]
    )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(max_intermediates + 1)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(path[0], list(pool))
    except VerificationError as exc:
        raise CertificatePathInvalidError(
            f"the RFC 5280 path validator refused the chain: {exc}",
            certificate=describe(path[0], "leaf"),
        ) from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """``None`` if ``issuer``'s key made ``cert``'s signature, else why not."""
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return f"signature does not verify under the key of '{_subject(issuer)}'"
    except Exception as exc:  # unsupported or malformed signature encodings
        return f"signature cannot be verified under the key of '{_subject(issuer)}' ({exc})"
    return None


def _positions(path: tuple[x509.Certificate, ...]) -> list[str]:
    if len(path) == 1:
        return ["root"]
    return ["leaf", *(f"intermediate {i}" for i in range(1, len(path) - 1)), "root"]


def _check_signature_algorithm(cert: x509.Certificate, position: str) -> None:
    # Checked before the signature itself: a weak hash must be refused by name, not reported
    # as a signature that happened not to verify.
    oid = cert.signature_algorithm_oid
    if oid in _EDDSA_SIGNATURES:
        return
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise CertificateAlgorithmError(
            f"unsupported signature algorithm {oid.dotted_string}",
            certificate=describe(cert, position),
        ) from exc
    if not isinstance(algorithm, _ALLOWED_HASHES):
        name = algorithm.name if algorithm is not None else oid.dotted_string
        raise CertificateAlgorithmError(
            f"signature hash {name} is not allowed (SHA-256, SHA-384 or SHA-512 required)",
            certificate=describe(cert, position),
        )


def _check_key(cert: x509.Certificate, position: str) -> None:
    try:
        key = cert.public_key()
    except Exception as exc:  # unknown or malformed key encodings
        raise CertificateAlgorithmError(
            f"unsupported public key ({exc})", certificate=describe(cert, position)
        ) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CertificateAlgorithmError(
                f"RSA key of {key.key_size} bits is below the {_MIN_RSA_BITS}-bit minimum",
                certificate=describe(cert, position),
            )
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise CertificateAlgorithmError(
                f"elliptic curve {key.curve.name} is not allowed",
                certificate=describe(cert, position),
            )
    elif not isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise CertificateAlgorithmError(
            f"public key type {type(key).__name__} is not allowed",
            certificate=describe(cert, position),
        )


def _check_crls(
    cert: x509.Certificate,
    position: str,
    issuer: x509.Certificate,
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
) -> list[x509.CertificateRevocationList]:
    used = []
    for crl in crls:
        if crl.issuer != cert.issuer:
            continue
        check_crl(crl, issuer, now, position="issuer of " + position)
        used.append(crl)
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateRevokedError(
                f"revoked by the CRL of '{_name(crl.issuer)}'", certificate=describe(cert, position)
            )
    return used


# CRL extensions this module processes; any other critical one makes the CRL unusable
# (RFC 5280 section 5.2: a CRL with an unrecognised critical extension must not be used).
_CRL_PROCESSED: Final = frozenset(
    {ExtensionOID.CRL_NUMBER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
     ExtensionOID.ISSUING_DISTRIBUTION_POINT}
)


def check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    now: datetime,
    *,
    position: str = "issuer",
) -> None:
    """The CRL may be used to judge certificates of ``issuer`` at ``now``, or a typed error.

    In order: its signature algorithm is allowed; the issuer may sign CRLs (keyUsage
    cRLSign when keyUsage is present); the signature verifies under the issuer's key; it is
    current (thisUpdate not in the future, nextUpdate present and not past); it is a complete
    CRL for every certificate of the issuer (no issuingDistributionPoint narrowing its scope,
    no delta CRL, no other critical extension).
    """
    ref = describe(issuer, position)
    # 1. Algorithms: the same policy as certificate signatures.
    if crl.signature_algorithm_oid not in _EDDSA_SIGNATURES:
        try:
            algorithm = crl.signature_hash_algorithm
        except UnsupportedAlgorithm:
            algorithm = None
        if not isinstance(algorithm, _ALLOWED_HASHES):
            raise CertificateCrlAlgorithmError(
                f"CRL signature algorithm {crl.signature_algorithm_oid.dotted_string} is not "
                "allowed (SHA-256, SHA-384, SHA-512 or EdDSA required)",
                certificate=ref,
            )
    # 2. The issuer must be allowed to sign CRLs.
    ku = _key_usage(issuer)
    if ku is not None and not ku.crl_sign:
        raise CertificateCrlIssuerError(
            "a CRL names this issuer but its keyUsage lacks cRLSign", certificate=ref
        )
    # 3. The signature.
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except Exception:  # any failure to check the CRL is a refusal
        valid = False
    if not valid:
        raise CertificateCrlInvalidError(
            "a CRL naming this issuer is not signed by it", certificate=ref
        )
    # 4. Time: a CRL from the future or past its nextUpdate proves nothing about now.
    if now < crl.last_update_utc:
        raise CertificateCrlNotCurrentError(
            f"the CRL's thisUpdate {crl.last_update_utc.isoformat()} is in the future",
            certificate=ref,
        )
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        raise CertificateCrlInvalidError(
            "the CRL of this issuer has no nextUpdate or is past it", certificate=ref
        )
    # 5. Scope: only complete CRLs are accepted, so no partition can hide a revocation.
    for ext in crl.extensions:
        if ext.oid == ExtensionOID.ISSUING_DISTRIBUTION_POINT:
            raise CertificateCrlScopeError(
                "the CRL has an issuingDistributionPoint: partitioned (partial) CRLs are not "
                "supported, a complete CRL is required",
                certificate=ref,
            )
        if ext.oid == ExtensionOID.DELTA_CRL_INDICATOR:
            raise CertificateCrlScopeError(
                "delta CRLs are not supported, a complete CRL is required", certificate=ref
            )
        if ext.critical and ext.oid not in _CRL_PROCESSED:
            raise CertificateCrlScopeError(
                f"the CRL has an unsupported critical extension {ext.oid.dotted_string}",
                certificate=ref,
            )


def _check_validity(cert: x509.Certificate, position: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"not valid before {cert.not_valid_before_utc.isoformat()} (now {now.isoformat()})",
            certificate=describe(cert, position),
        )
    if now > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})",
            certificate=describe(cert, position),
        )


def _check_critical_extensions(cert: x509.Certificate, position: str) -> None:
    for ext in cert.extensions:
        if ext.critical and ext.oid not in _PROCESSED_EXTENSIONS:
            raise CertificateUnknownCriticalExtensionError(
                f"critical extension {ext.oid.dotted_string} is not supported",
                certificate=describe(cert, position),
            )


def _check_issuer(cert: x509.Certificate, position: str, *, intermediates_below: int) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertificateNotCaError(
            "issues certificates but has no basicConstraints", certificate=describe(cert, position)
        ) from None
    if not bc.ca:
        raise CertificateNotCaError(
            "issues certificates but basicConstraints says cA=false",
            certificate=describe(cert, position),
        )
    ku = _key_usage(cert)
    if ku is not None and not ku.key_cert_sign:
        raise CertificateNotCaError(
            "issues certificates but keyUsage lacks keyCertSign",
            certificate=describe(cert, position),
        )
    if bc.path_length is not None and intermediates_below > bc.path_length:
        raise CertificatePathLengthError(
            f"pathLenConstraint {bc.path_length} allows fewer than the {intermediates_below} "
            "intermediate CAs below it",
            certificate=describe(cert, position),
        )


def _check_leaf_usage(
    leaf: x509.Certificate,
    *,
    is_root: bool,
    required_key_usage: Collection[KeyUsageName],
    required_eku: x509.ObjectIdentifier | None,
    eku_required: bool,
    leaf_may_be_ca: bool,
) -> None:
    position = "root" if is_root else "leaf"
    if not leaf_may_be_ca:
        try:
            bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is not None and bc.ca:
            raise CertificateKeyUsageError(
                "is a CA certificate; an end-entity certificate is required",
                certificate=describe(leaf, position),
            )
    if required_key_usage:
        ku = _key_usage(leaf)
        if ku is None:
            raise CertificateKeyUsageError(
                f"has no keyUsage extension; {', '.join(sorted(required_key_usage))} required",
                certificate=describe(leaf, position),
            )
        missing = sorted(name for name in required_key_usage if not getattr(ku, name))
        if missing:
            raise CertificateKeyUsageError(
                f"keyUsage lacks {', '.join(missing)}", certificate=describe(leaf, position)
            )
    if required_eku is not None:
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        if eku is None:
            if eku_required:
                raise CertificateEkuError(
                    f"has no extendedKeyUsage; {required_eku.dotted_string} required",
                    certificate=describe(leaf, position),
                )
        elif required_eku not in eku:
            raise CertificateEkuError(
                f"extendedKeyUsage does not include {required_eku.dotted_string}",
                certificate=describe(leaf, position),
            )


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _subject(cert: x509.Certificate) -> str:
    return _name(cert.subject)


def _name(name: x509.Name) -> str:
    try:
        return name.rfc4514_string()
    except ValueError:
        return "<unprintable name>"
