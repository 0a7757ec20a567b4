"""Reason codes of signed images and of X.509 certificate chains.

Two families live here:

* :class:`CertificateChainError` and its subclasses (``cert_*``) are raised by
  :mod:`sandboxsec.attestation.x509chain` for *any* chain: image publishers and TPM endorsement
  key certificates alike.  Each instance names the certificate that failed (its position in the
  chain, subject and serial) so an operator can fix the right file.
* :class:`ImageError` and its subclasses (``image_*``) are raised while parsing, signing and
  verifying image manifests (DSSE envelopes carrying an in-toto Statement).

Every class has one stable reason code; codes are documented in ``docs/image-signing.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sandboxsec.errors import InputError, PayloadTooLargeError, VerificationError

__all__ = [
    "CertificateAlgorithmError",
    "CertificateChainError",
    "CertificateChainTooLongError",
    "CertificateCrlAlgorithmError",
    "CertificateCrlInvalidError",
    "CertificateCrlIssuerError",
    "CertificateCrlNotCurrentError",
    "CertificateCrlScopeError",
    "CertificateEkuError",
    "CertificateExpiredError",
    "CertificateKeyUsageError",
    "CertificateMalformedError",
    "CertificateNotCaError",
    "CertificateNotYetValidError",
    "CertificatePathInvalidError",
    "CertificatePathLengthError",
    "CertificateRef",
    "CertificateRevokedError",
    "CertificateSignatureError",
    "CertificateUnknownCriticalExtensionError",
    "CertificateUntrustedIssuerError",
    "ImageDigestMismatchError",
    "ImageDigestRevokedError",
    "ImageError",
    "ImageManifestExpiredError",
    "ImageManifestMalformedError",
    "ImageManifestNotYetValidError",
    "ImageManifestTooLargeError",
    "ImagePayloadTypeError",
    "ImageSignatureAlgorithmError",
    "ImageSignatureInvalidError",
    "ImageSignatureMissingError",
    "ImageSigningKeyMismatchError",
    "ImageStatementInvalidError",
    "ImageTrustStoreEmptyError",
    "ImageUnreadableError",
    "TrustStoreInvalidError",
]


@dataclass(frozen=True, slots=True)
class CertificateRef:
    """Which certificate of a chain an error is about; never contains key material."""

    position: (
        str  # "leaf", "intermediate 1", ..., "root", or "certificate N" before the path is known
    )
    subject: str  # RFC 4514, "" when the bytes did not parse
    serial: int | None = None

    def describe(self) -> str:
        name = self.subject or "<unparsable>"
        serial = f", serial {self.serial:#x}" if self.serial is not None else ""
        return f"{self.position} certificate '{name}'{serial}"


# -- certificate chains ------------------------------------------------------------------------


class CertificateChainError(VerificationError):
    """A certificate chain did not verify."""

    code = "cert_chain_invalid"

    def __init__(self, message: str = "", *, certificate: CertificateRef | None = None) -> None:
        if certificate is not None and message:
            message = f"{certificate.describe()}: {message}"
        super().__init__(message)
        self.certificate = certificate


class CertificateMalformedError(CertificateChainError):
    """A certificate is not strict DER X.509 (or the PEM around it is broken)."""

    code = "cert_malformed"


class CertificateExpiredError(CertificateChainError):
    """A certificate in the chain is past its notAfter."""

    code = "cert_expired"


class CertificateNotYetValidError(CertificateChainError):
    """A certificate in the chain is before its notBefore."""

    code = "cert_not_yet_valid"


class CertificateKeyUsageError(CertificateChainError):
    """The leaf certificate lacks a required key usage bit."""

    code = "cert_key_usage_invalid"


class CertificateEkuError(CertificateChainError):
    """The leaf certificate's extended key usage does not allow this purpose."""

    code = "cert_eku_invalid"


class CertificateUntrustedIssuerError(CertificateChainError):
    """No path leads from the certificate to a configured trust root."""

    code = "cert_untrusted_issuer"


class CertificateRevokedError(CertificateChainError):
    """A certificate in the chain is on a revocation list."""

    code = "cert_revoked"


class CertificateSignatureError(CertificateChainError):
    """A certificate's signature does not verify under its issuer's key."""

    code = "cert_signature_invalid"


class CertificateNotCaError(CertificateChainError):
    """An issuing certificate is not a CA (basicConstraints or keyCertSign missing)."""

    code = "cert_not_ca"


class CertificatePathLengthError(CertificateChainError):
    """An issuing CA's pathLenConstraint is exceeded."""

    code = "cert_path_length_exceeded"


class CertificateUnknownCriticalExtensionError(CertificateChainError):
    """A certificate carries a critical extension this verifier does not process."""

    code = "cert_unknown_critical_extension"


class CertificateAlgorithmError(CertificateChainError):
    """A certificate uses a key or signature algorithm outside policy (weak hash, small key)."""

    code = "cert_algorithm_unsupported"


class CertificateChainTooLongError(CertificateChainError):
    """The chain offers more certificates than the verifier accepts."""

    code = "cert_chain_too_long"


class CertificatePathInvalidError(CertificateChainError):
    """The RFC 5280 path validator (cryptography's) refused a chain this module's own checks
    passed; the message carries the validator's reason."""

    code = "cert_path_invalid"


class CertificateCrlInvalidError(CertificateChainError):
    """A configured CRL is not signed by its issuer or is past its nextUpdate."""

    code = "cert_crl_invalid"


class CertificateCrlNotCurrentError(CertificateCrlInvalidError):
    """A configured CRL's thisUpdate is in the future (a stale one is ``cert_crl_invalid``)."""

    code = "cert_crl_not_yet_valid"


class CertificateCrlScopeError(CertificateCrlInvalidError):
    """A configured CRL is not a complete CRL (issuingDistributionPoint, delta CRL) or has
    an unsupported critical extension."""

    code = "cert_crl_scope_unsupported"


class CertificateCrlIssuerError(CertificateCrlInvalidError):
    """The issuer a configured CRL names may not sign CRLs (keyUsage without cRLSign)."""

    code = "cert_crl_issuer_not_crl_signer"


class CertificateCrlAlgorithmError(CertificateCrlInvalidError):
    """A configured CRL is signed with an algorithm outside policy (weak or unknown hash)."""

    code = "cert_crl_algorithm_unsupported"


# -- trust store -------------------------------------------------------------------------------


class TrustStoreInvalidError(InputError):
    """The trust store files are unreadable or malformed."""

    code = "trust_store_invalid"


# -- image manifests ---------------------------------------------------------------------------


class ImageError(VerificationError):
    """An image manifest or image did not verify."""

    code = "image_invalid"


class ImageManifestMalformedError(ImageError):
    """The manifest is not a well-formed DSSE JSON envelope."""

    code = "image_manifest_malformed"


class ImageManifestTooLargeError(PayloadTooLargeError):
    """The manifest exceeds the size limit."""

    code = "image_manifest_too_large"


class ImagePayloadTypeError(ImageError):
    """The envelope's payloadType is not an in-toto Statement."""

    code = "image_payload_type_unsupported"


class ImageSignatureMissingError(ImageError):
    """The envelope carries no signature with a certificate."""

    code = "image_signature_missing"


class ImageSignatureAlgorithmError(ImageError):
    """The signing key is neither ECDSA P-256 nor Ed25519."""

    code = "image_signature_algorithm_unsupported"


class ImageSignatureInvalidError(ImageError):
    """The envelope signature does not verify under the signing certificate's key."""

    code = "image_signature_invalid"


class ImageStatementInvalidError(ImageError):
    """The signed payload is not a valid in-toto Statement v1 with image reference values."""

    code = "image_statement_invalid"


class ImageManifestExpiredError(ImageError):
    """The manifest is past its expiry."""

    code = "image_manifest_expired"


class ImageManifestNotYetValidError(ImageError):
    """The manifest's issued_at is later than the verification time (beyond clock skew)."""

    code = "image_manifest_not_yet_valid"


class ImageDigestMismatchError(ImageError):
    """The image's sha256 digest differs from the digest the manifest signs."""

    code = "image_digest_mismatch"


class ImageDigestRevokedError(ImageError):
    """The image digest is on the revocation list."""

    code = "image_digest_revoked"


class ImageTrustStoreEmptyError(ImageError):
    """No publisher trust root is configured, so no image can be trusted."""

    code = "image_trust_store_empty"


class ImageSigningKeyMismatchError(InputError):
    """The signing key does not belong to the signing certificate."""

    code = "image_signing_key_mismatch"


class ImageUnreadableError(InputError):
    """The image file cannot be read."""

    code = "image_unreadable"
