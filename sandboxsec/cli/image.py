"""``sandboxsec image``: sign an image's reference values, verify a signed image offline.

``image sign`` streams the image to get its SHA-256, builds the in-toto statement (subject,
PCR reference values, event digests, version, expiry) and writes a DSSE envelope signed with an
ECDSA P-256 or Ed25519 key whose certificate chains to the publisher CA.

``image verify`` needs no service: it checks the envelope against the given trust roots and
revocation lists, then streams the image and compares digests.  Exit 0 valid, 1 invalid (the
reason code and message on stderr), 2 usage or input error (unreadable files, bad options).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sandboxsec.attestation.digest import sha256_file
from sandboxsec.attestation.image import (
    MAX_ENVELOPE_BYTES,
    PCR_BANKS,
    ReferenceValues,
    VerifiedManifest,
    sign_manifest,
    verify_image,
)
from sandboxsec.attestation.image_errors import (
    CertificateChainError,
    ImageError,
    ImageManifestTooLargeError,
)
from sandboxsec.attestation.trust import TrustStore, load_crl, parse_revocations
from sandboxsec.attestation.x509chain import load_pem_certificates
from sandboxsec.cli._args import decimal
from sandboxsec.cli._common import print_json
from sandboxsec.clock import SystemClock, rfc3339
from sandboxsec.errors import InputError, SandboxSecError

__all__ = ["register"]

_PCR_ARG = re.compile(r"(?:(?P<bank>[a-z0-9]+):)?(?P<index>0|[1-9][0-9]?)=(?P<hex>[0-9a-fA-F]+)")
_MAX_INPUT_FILE = 4 * 1024 * 1024


def register(subs: Any) -> None:
    """Add ``image sign``, ``image verify`` and ``image digest``."""
    p = subs.add_parser("image", help="sign and verify VM images")
    s = p.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    s.required = True

    sign = s.add_parser(
        "sign",
        help="sign an image digest and its reference PCR values (DSSE + in-toto)",
        description="Write a DSSE envelope over an in-toto Statement naming IMAGE's SHA-256 "
        "and the PCR values a measured boot of it produces.",
    )
    sign.add_argument("image", type=Path, help="the image file (streamed, never loaded whole)")
    sign.add_argument(
        "--key", required=True, type=Path, help="PEM private key (ECDSA P-256 or Ed25519)"
    )
    sign.add_argument("--key-password-file", type=Path, help="file holding the key's passphrase")
    sign.add_argument(
        "--cert", required=True, type=Path, help="PEM signing certificate (may include its chain)"
    )
    sign.add_argument("--chain", type=Path, help="PEM intermediate CA certificates")
    sign.add_argument(
        "--pcr",
        action="append",
        default=[],
        metavar="[BANK:]N=HEX",
        help="expected PCR value; repeatable; BANK defaults to --pcr-bank",
    )
    sign.add_argument("--pcr-bank", default="sha256", choices=sorted(PCR_BANKS))
    sign.add_argument(
        "--event-digest",
        action="append",
        default=[],
        metavar="N=HEX",
        help="an allowed SHA-256 event digest in PCR N's event log; repeatable",
    )
    sign.add_argument("--name", help="image name in the statement (default: the file name)")
    sign.add_argument(
        "--version", dest="image_version", default="unversioned", help="image version"
    )
    when = sign.add_mutually_exclusive_group()
    when.add_argument("--expires", help="expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z)")
    when.add_argument(
        "--valid-days", type=decimal, default=90, help="expiry in days from now (default 90)"
    )
    sign.add_argument(
        "-o", "--output", required=True, type=Path, help="where to write the manifest"
    )
    sign.set_defaults(handler=_sign)

    verify = s.add_parser(
        "verify",
        help="verify a signed image offline (exit 0 valid, 1 invalid, 2 usage error)",
    )
    verify.add_argument("image", type=Path)
    verify.add_argument("manifest", type=Path)
    verify.add_argument(
        "--trust-root",
        action="append",
        default=[],
        type=Path,
        help="PEM publisher CA root(s); repeatable",
    )
    verify.add_argument(
        "--trust-dir",
        type=Path,
        help="a directory in the attestation/ layout (roots and revocations)",
    )
    verify.add_argument(
        "--revoked",
        action="append",
        default=[],
        type=Path,
        help="revocation list (see docs); repeatable",
    )
    verify.add_argument(
        "--crl", action="append", default=[], type=Path, help="CRL file (PEM or DER); repeatable"
    )
    verify.add_argument("--at", help="verify as of this RFC 3339 time instead of now")
    verify.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    verify.set_defaults(handler=_verify)

    digest = s.add_parser("digest", help="print an image's sha256 digest (streamed)")
    digest.add_argument("image", type=Path)
    digest.set_defaults(handler=_digest)


# -- sign --------------------------------------------------------------------------------------


def _sign(args: argparse.Namespace) -> int:
    try:
        key = _load_key(args.key, args.key_password_file)
        chain = _leaf_first(_load_chain(args.cert, args.chain), key)
        reference = ReferenceValues(
            pcrs=_parse_pcrs(args.pcr, args.pcr_bank),
            event_digests=_parse_event_digests(args.event_digest),
        )
        now = SystemClock().now().replace(microsecond=0)
        expires_at = _parse_time(args.expires, "--expires") if args.expires else None
        if expires_at is None:
            if args.valid_days <= 0:
                raise InputError("--valid-days must be positive")
            expires_at = now + timedelta(days=args.valid_days)
        if expires_at <= now:
            raise InputError("the expiry is in the past")
        image_digest = sha256_file(args.image)
        envelope = sign_manifest(
            image_name=args.name or args.image.name,
            image_digest=image_digest,
            version=args.image_version,
            expires_at=expires_at,
            issued_at=now,
            reference=reference,
            key=key,
            cert_chain=chain,
        )
        _write_atomically(args.output, envelope)
    except SandboxSecError as exc:
        # Every signing failure is the operator's input: exit 2, whatever the error family.
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    print_json(
        {
            "manifest": str(args.output),
            "image_name": args.name or args.image.name,
            "image_digest": image_digest,
            "version": args.image_version,
            "expires_at": rfc3339(expires_at),
            "publisher": chain[0].subject.rfc4514_string(),
        }
    )
    return 0


def _load_key(
    path: Path, password_file: Path | None
) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    data = _read(path, "signing key")
    password = _read(password_file, "key password file").rstrip(b"\r\n") if password_file else None
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:
        # Raised for "password given but key not encrypted" and the reverse; the message
        # names neither the key nor the password.
        raise InputError(f"{path}: {exc}") from None
    except Exception:
        raise InputError(f"{path}: not a readable PEM private key (or wrong passphrase)") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise InputError(f"{path}: only ECDSA P-256 and Ed25519 keys may sign images")


def _load_chain(cert_path: Path, chain_path: Path | None) -> list[x509.Certificate]:
    try:
        certs = list(load_pem_certificates(_read(cert_path, "certificate"), source=str(cert_path)))
        if chain_path is not None:
            certs += load_pem_certificates(_read(chain_path, "chain"), source=str(chain_path))
    except CertificateChainError as exc:
        raise InputError(exc.message) from exc
    leaf, rest = certs[0], certs[1:]
    # Roots are never carried in the manifest: the verifier has its own.
    return [leaf, *(c for c in rest if c.issuer != c.subject)]


def _leaf_first(
    chain: list[x509.Certificate], key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
) -> list[x509.Certificate]:
    # Bundles are not always leaf-first; the certificate of the signing key is the leaf.
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    mine = key.public_key().public_bytes(serialization.Encoding.DER, spki)
    for i, cert in enumerate(chain):
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) == mine:
            return [cert, *chain[:i], *chain[i + 1 :]]
    return chain  # sign_manifest reports the mismatch


def _parse_pcrs(values: list[str], default_bank: str) -> dict[str, dict[int, bytes]]:
    pcrs: dict[str, dict[int, bytes]] = {}
    for value in values:
        match = _PCR_ARG.fullmatch(value)
        if match is None or len(match["hex"]) % 2:
            raise InputError(f"--pcr {value!r}: expected [BANK:]N=HEX")
        bank = match["bank"] or default_bank
        index = int(match["index"])
        bank_values = pcrs.setdefault(bank, {})
        if index in bank_values:
            raise InputError(f"--pcr {bank}:{index} given twice")
        bank_values[index] = bytes.fromhex(match["hex"])
    if not pcrs:
        raise InputError(
            "at least one --pcr is required: a manifest without PCRs would accept any boot"
        )
    return pcrs


def _parse_event_digests(values: list[str]) -> dict[int, tuple[bytes, ...]]:
    events: dict[int, list[bytes]] = {}
    for value in values:
        match = _PCR_ARG.fullmatch(value)
        if match is None or match["bank"] is not None or len(match["hex"]) != 64:
            raise InputError(f"--event-digest {value!r}: expected N=<64 hex digits of SHA-256>")
        events.setdefault(int(match["index"]), []).append(bytes.fromhex(match["hex"]))
    return {i: tuple(d) for i, d in events.items()}


def _write_atomically(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a truncated manifest where a good one was.
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None


# -- verify ------------------------------------------------------------------------------------


def _verify(args: argparse.Namespace) -> int:
    try:
        trust = _trust_from_args(args)
        now = _parse_time(args.at, "--at") if args.at else SystemClock().now()
    except SandboxSecError as exc:
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    try:
        envelope = _read(args.manifest, "manifest", limit=MAX_ENVELOPE_BYTES)
        result = verify_image(args.image, envelope, trust, now)
    except (ImageError, CertificateChainError, ImageManifestTooLargeError) as exc:
        if args.json:
            print_json({"valid": False, "error": {"code": exc.reason, "message": exc.message}})
        print(f"invalid: {exc.reason}: {exc.message}", file=sys.stderr)
        return 1
    except SandboxSecError as exc:  # the image could not be read, and the like
        print(f"error: {exc.reason}: {exc.message}", file=sys.stderr)
        return 2
    if args.json:
        print_json({"valid": True, "manifest": _manifest_json(result)})
    else:
        print(
            f"valid: {result.image_name} {result.image_digest} version {result.version}, "
            f"signed by '{result.publisher}' (root '{result.publisher_root}'), "
            f"expires {rfc3339(result.expires_at)}"
        )
    return 0


def _trust_from_args(args: argparse.Namespace) -> TrustStore:
    if not args.trust_root and args.trust_dir is None:
        raise InputError("give at least one --trust-root or a --trust-dir")
    if args.trust_dir is not None and not args.trust_dir.is_dir():
        raise InputError(f"{args.trust_dir}: not a directory")
    trust = (
        TrustStore.from_directory(args.trust_dir) if args.trust_dir is not None else TrustStore()
    )
    if args.trust_root:
        trust = trust.with_roots(
            TrustStore.from_pem(*(_read(p, "trust root") for p in args.trust_root)).roots
        )
    for path in args.revoked:
        try:
            text = _read(path, "revocation list").decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        trust = trust.with_revocations(parse_revocations(text, source=str(path)))
    crls = [load_crl(_read(path, "CRL"), source=str(path)) for path in args.crl]
    return trust.with_crls(crls) if crls else trust


def _manifest_json(m: VerifiedManifest) -> dict[str, Any]:
    return {
        "image_name": m.image_name,
        "image_digest": m.image_digest,
        "version": m.version,
        "issued_at": rfc3339(m.issued_at) if m.issued_at else None,
        "expires_at": rfc3339(m.expires_at),
        "publisher": m.publisher,
        "publisher_root": m.publisher_root,
        "signer_fingerprint": m.signer_fingerprint,
        "signature_algorithm": m.signature_algorithm,
        "manifest_digest": m.manifest_digest,
        "reference": m.reference.to_json(),
    }


# -- digest ------------------------------------------------------------------------------------


def _digest(args: argparse.Namespace) -> int:
    print(sha256_file(args.image))
    return 0


# -- helpers -----------------------------------------------------------------------------------


def _read(path: Path, what: str, *, limit: int = _MAX_INPUT_FILE) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > limit:
        if what == "manifest":
            raise ImageManifestTooLargeError(f"{path}: larger than {limit} bytes")
        raise InputError(f"{what} {path}: larger than {limit} bytes")
    return data


def _parse_time(text: str, option: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            f"{option} {text!r}: expected RFC 3339, e.g. 2027-01-01T00:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise InputError(f"{option} {text!r}: give a time zone (Z or +hh:mm)")
    return when.astimezone(UTC)
