"""The publisher trust store: which CAs may sign images, and what has been revoked.

A :class:`TrustStore` is an immutable value.  It is built from files by
:meth:`TrustStore.from_directory` (the layout of the top-level ``attestation/`` directory) or
assembled in code.  An empty store trusts nothing: verification against it is refused with
``image_trust_store_empty``, never waved through.

Revocation list format (``revocations/revoked.txt``, or any file given to ``--revoked``): one
entry per line, ``#`` starts a comment::

    cert-serial:0x1f2e          # any certificate on the path with this serial (hex or decimal)
    cert-sha256:<64 hex>        # a certificate by the SHA-256 of its DER
    image:sha256:<64 hex>       # an image digest that must never be accepted again
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sandboxsec.attestation.image_errors import CertificateChainError, TrustStoreInvalidError
from sandboxsec.attestation.x509chain import load_pem_certificates

__all__ = ["Revocations", "TrustStore", "load_crl", "parse_revocations"]

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_SERIAL: Final = re.compile(r"0x[0-9a-f]{1,64}|[0-9]{1,80}")
_MAX_TRUST_FILE_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Revocations:
    """Revoked certificates (by serial or fingerprint) and revoked image digests."""

    serials: frozenset[int] = frozenset()
    fingerprints: frozenset[str] = frozenset()
    image_digests: frozenset[str] = frozenset()  # "sha256:<hex>"

    def merge(self, other: Revocations) -> Revocations:
        return Revocations(
            serials=self.serials | other.serials,
            fingerprints=self.fingerprints | other.fingerprints,
            image_digests=self.image_digests | other.image_digests,
        )


def parse_revocations(text: str, *, source: str = "revocation list") -> Revocations:
    """Parse the line format described in the module docstring; unknown lines are errors.

    A typo in a revocation list must not silently un-revoke something, so every line is
    either blank, a comment, or a well-formed entry.
    """
    serials: set[int] = set()
    fingerprints: set[str] = set()
    images: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(":")
        value = value.strip().lower()
        if kind == "cert-serial":
            # ASCII digits only: int() would also take "1_000" or non-Latin digits.
            if not _SERIAL.fullmatch(value):
                raise TrustStoreInvalidError(f"{source} line {lineno}: bad serial {value!r}")
            serials.add(int(value, 16) if value.startswith("0x") else int(value, 10))
        elif kind == "cert-sha256" and _HEX64.fullmatch(value):
            fingerprints.add(value)
        elif kind == "image" and value.startswith("sha256:") and _HEX64.fullmatch(value[7:]):
            images.add(value)
        else:
            raise TrustStoreInvalidError(
                f"{source} line {lineno}: expected cert-serial:N, cert-sha256:HEX or "
                "image:sha256:HEX"
            )
    return Revocations(frozenset(serials), frozenset(fingerprints), frozenset(images))


@dataclass(frozen=True, slots=True)
class TrustStore:
    """Publisher trust roots, revocations and CRLs, as one immutable value.

    ``fingerprint`` identifies the contents, so a cache of verification results can key on
    it and never serve a result computed under an older revocation list.
    """

    roots: tuple[x509.Certificate, ...] = ()
    revocations: Revocations = field(default_factory=Revocations)
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", self._compute_fingerprint())

    @property
    def is_empty(self) -> bool:
        return not self.roots

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        for root in sorted(r.public_bytes(serialization.Encoding.DER) for r in self.roots):
            h.update(b"root\0" + root)
        for serial in sorted(self.revocations.serials):
            h.update(b"serial\0" + str(serial).encode())
        for fp in sorted(self.revocations.fingerprints):
            h.update(b"fp\0" + fp.encode())
        for digest in sorted(self.revocations.image_digests):
            h.update(b"image\0" + digest.encode())
        for crl in sorted(c.public_bytes(serialization.Encoding.DER) for c in self.crls):
            h.update(b"crl\0" + crl)
        return h.hexdigest()

    def with_roots(self, roots: Iterable[x509.Certificate]) -> TrustStore:
        return replace(self, roots=self.roots + tuple(roots))

    def with_revocations(self, revocations: Revocations) -> TrustStore:
        return replace(self, revocations=self.revocations.merge(revocations))

    def with_crls(self, crls: Iterable[x509.CertificateRevocationList]) -> TrustStore:
        return replace(self, crls=self.crls + tuple(crls))

    @classmethod
    def from_pem(cls, *pem_bundles: bytes) -> TrustStore:
        """A store whose roots are every certificate in the given PEM bundles."""
        roots: list[x509.Certificate] = []
        for i, data in enumerate(pem_bundles):
            roots.extend(_certs(data, f"trust root bundle {i + 1}"))
        return cls(roots=tuple(roots))

    @classmethod
    def from_directory(cls, base: Path) -> TrustStore:
        """Load the ``attestation/`` layout rooted at ``base``.

        * ``trust-roots/publishers/*.pem``: publisher CA roots (PEM, several per file allowed);
        * ``revocations/*.txt``: revocation lists in the line format above;
        * ``revocations/*.crl``: CRLs, PEM or DER.

        Missing directories yield an empty (deny-everything) part, never an error; unreadable
        or malformed files are :class:`TrustStoreInvalidError`.
        """
        roots: list[x509.Certificate] = []
        for path in _files(base / "trust-roots" / "publishers", ".pem"):
            roots.extend(_certs(_read(path), str(path)))
        revocations = Revocations()
        crls: list[x509.CertificateRevocationList] = []
        for path in _files(base / "revocations", ".txt"):
            try:
                text = _read(path).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TrustStoreInvalidError(f"{path}: not UTF-8 text") from exc
            revocations = revocations.merge(parse_revocations(text, source=str(path)))
        for path in _files(base / "revocations", ".crl"):
            crls.append(load_crl(_read(path), source=str(path)))
        return cls(roots=tuple(roots), revocations=revocations, crls=tuple(crls))


def load_crl(data: bytes, *, source: str = "CRL") -> x509.CertificateRevocationList:
    """A CRL from PEM or DER bytes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        # The parser is lazy: read every field the chain check uses, so a broken one fails
        # here, at load time, with the file named.
        _ = crl.issuer.rfc4514_string(), crl.last_update_utc, crl.next_update_utc
        _ = [(r.serial_number, r.revocation_date_utc) for r in crl]
        return crl
    except Exception as exc:  # the parser raises several types on malformed input
        raise TrustStoreInvalidError(f"{source}: not a CRL ({exc})") from exc


def _certs(data: bytes, source: str) -> tuple[x509.Certificate, ...]:
    try:
        return load_pem_certificates(data, source=source)
    except CertificateChainError as exc:
        raise TrustStoreInvalidError(exc.message) from exc


def _files(directory: Path, suffix: str) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix == suffix and p.is_file())


def _read(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_TRUST_FILE_BYTES + 1)
    except OSError as exc:
        raise TrustStoreInvalidError(f"{path}: cannot read ({exc.strerror})") from exc
    if len(data) > _MAX_TRUST_FILE_BYTES:
        raise TrustStoreInvalidError(f"{path}: larger than {_MAX_TRUST_FILE_BYTES} bytes")
    return data
