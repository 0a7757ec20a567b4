"""Signed image manifests: a DSSE envelope carrying an in-toto Statement v1.

The manifest says "the image named N with SHA-256 digest D, version V, boots to these PCR
values (and these event digests), until time T", signed by a publisher whose X.509 certificate
chains to a configured trust root.

Wire format (JSON, DSSE v1 with one extension)::

    {"payloadType": "application/vnd.in-toto+json",
     "payload": base64(statement),
     "signatures": [{"keyid": sha256-hex of the signer's SubjectPublicKeyInfo,
                     "sig": base64(signature over PAE(payloadType, payload)),
                     "certificates": [base64 DER leaf, base64 DER intermediate, ...]}]}

``certificates`` is an extension field (DSSE lets producers add fields); roots are never
carried, they come from the verifier's :class:`~sandboxsec.attestation.trust.TrustStore`.

The statement::

    {"_type": "https://in-toto.io/Statement/v1",
     "subject": [{"name": "<image name>", "digest": {"sha256": "<hex>"}}],
     "predicateType": PREDICATE_TYPE,
     "predicate": {"version": "...", "issued_at": RFC 3339, "expires_at": RFC 3339,
                   "pcrs": {"sha256": {"0": "<hex>", ...}},
                   "event_digests": {"4": ["<sha256 hex>", ...]}}}

Signing keys are pinned by type: ECDSA P-256 signs with SHA-256, Ed25519 signs raw; nothing
else is accepted, so no algorithm can be chosen by the envelope.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sandboxsec.attestation.digest import parse_digest, sha256_file
from sandboxsec.attestation.image_errors import (
    CertificateChainError,
    ImageDigestMismatchError,
    ImageDigestRevokedError,
    ImageError,
    ImageManifestExpiredError,
    ImageManifestMalformedError,
    ImageManifestNotYetValidError,
    ImageManifestTooLargeError,
    ImagePayloadTypeError,
    ImageSignatureAlgorithmError,
    ImageSignatureInvalidError,
    ImageSignatureMissingError,
    ImageSigningKeyMismatchError,
    ImageStatementInvalidError,
    ImageTrustStoreEmptyError,
)
from sandboxsec.attestation.trust import TrustStore
from sandboxsec.attestation.x509chain import (
    CODE_SIGNING,
    DIGITAL_SIGNATURE,
    VerifiedChain,
    verify_chain,
)
from sandboxsec.clock import rfc3339
from sandboxsec.encoding import b64decode_strict
from sandboxsec.errors import InputError, SandboxSecError

__all__ = [
    "MAX_CLOCK_SKEW",
    "MAX_ENVELOPE_BYTES",
    "PAYLOAD_TYPE",
    "PCR_BANKS",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Envelope",
    "EnvelopeSignature",
    "ManifestVerifier",
    "ReferenceValues",
    "SigningKey",
    "Statement",
    "VerifiedManifest",
    "build_statement",
    "pae",
    "parse_envelope",
    "parse_statement",
    "sign_manifest",
    "verify_image",
    "verify_manifest",
]

PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "urn:sandboxsec:predicate:image-reference:v1"

#: Bank name -> digest size.  The names are those of the API's ``pcrs`` field.
PCR_BANKS: Final[Mapping[str, int]] = MappingProxyType(
    {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
)
PCR_COUNT: Final = 24

MAX_ENVELOPE_BYTES: Final = 1024 * 1024
MAX_SIGNATURES: Final = 8
MAX_CERTIFICATES: Final = 8
MAX_NAME_LENGTH: Final = 1024
MAX_VERSION_LENGTH: Final = 128
MAX_EVENT_DIGESTS: Final = 4096
#: Tolerated difference between the publisher's clock (issued_at) and the verifier's.
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

_HEX: Final = re.compile(r"[0-9a-f]+")
_PCR_INDEX: Final = re.compile(r"0|[1-9][0-9]?")
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_B64: Final = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")


# -- values ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceValues:
    """What a measured boot of the image must produce.

    ``pcrs``: bank name (``sha1``, ``sha256``, ``sha384``, ``sha512``) -> PCR index -> expected
    value.  ``event_digests``: PCR index -> the SHA-256 event digests allowed in that PCR's
    event log (empty when the publisher pins PCR values only).  Both are copied into read-only
    mappings; construction raises :class:`~sandboxsec.errors.InputError` on a bad bank, index
    or value length, and when no PCR value at all is given (that would accept any boot).
    """

    pcrs: Mapping[str, Mapping[int, bytes]]
    event_digests: Mapping[int, tuple[bytes, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        pcrs: dict[str, Mapping[int, bytes]] = {}
        for bank, values in dict(self.pcrs).items():
            size = PCR_BANKS.get(bank) if isinstance(bank, str) else None
            if size is None:
                raise InputError(f"unknown PCR bank {bank!r}; expected one of {sorted(PCR_BANKS)}")
            checked: dict[int, bytes] = {}
            for index, value in dict(values).items():
                _check_pcr_index(index)
                if not isinstance(value, bytes) or len(value) != size:
                    raise InputError(f"PCR {bank}:{index} must be {size} bytes")
                checked[index] = value
            if checked:
                pcrs[bank] = MappingProxyType(dict(sorted(checked.items())))
        if not pcrs:
            raise InputError("reference values must name at least one PCR value")
        events: dict[int, tuple[bytes, ...]] = {}
        total = 0
        for index, digests in dict(self.event_digests).items():
            _check_pcr_index(index)
            values_t = tuple(digests)
            total += len(values_t)
            if not values_t or any(not isinstance(d, bytes) or len(d) != 32 for d in values_t):
                raise InputError(
                    f"event digests of PCR {index} must be non-empty 32-byte SHA-256 values"
                )
            events[index] = values_t
        if total > MAX_EVENT_DIGESTS:
            raise InputError(f"more than {MAX_EVENT_DIGESTS} event digests")
        object.__setattr__(self, "pcrs", MappingProxyType(dict(sorted(pcrs.items()))))
        object.__setattr__(self, "event_digests", MappingProxyType(dict(sorted(events.items()))))

    def __hash__(self) -> int:
        # The mappings are read-only copies, so hashing their sorted contents is stable.
        return hash(
            (
                tuple((bank, tuple(values.items())) for bank, values in self.pcrs.items()),
                tuple(self.event_digests.items()),
            )
        )

    def to_json(self) -> dict[str, Any]:
        """The ``pcrs`` and ``event_digests`` members of the predicate."""
        out: dict[str, Any] = {
            "pcrs": {
                bank: {str(i): v.hex() for i, v in values.items()}
                for bank, values in self.pcrs.items()
            }
        }
        if self.event_digests:
            out["event_digests"] = {
                str(i): [d.hex() for d in ds] for i, ds in self.event_digests.items()
            }
        return out


def _check_pcr_index(index: object) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < PCR_COUNT:
        raise InputError(f"PCR index {index!r} is outside 0..{PCR_COUNT - 1}")


@dataclass(frozen=True)
class Statement:
    """The signed claims of a manifest, parsed and validated."""

    image_name: str
    image_digest: str  # "sha256:<hex>"
    version: str
    expires_at: datetime
    reference: ReferenceValues
    issued_at: datetime | None = None


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signature, certificate chain, expiry and revocation status all passed.

    ``manifest_digest`` (SHA-256 hex of the envelope bytes) is a cache key;
    ``valid_until`` is the earliest of the manifest expiry, the chain's notAfter and any CRL's
    nextUpdate, after which the same envelope must be verified again.
    """

    image_name: str
    image_digest: str
    version: str
    expires_at: datetime
    reference: ReferenceValues
    publisher: str
    manifest_digest: str
    issued_at: datetime | None
    publisher_root: str
    signer_fingerprint: str
    signature_algorithm: str
    valid_from: datetime
    valid_until: datetime


@dataclass(frozen=True)
class EnvelopeSignature:
    """One DSSE signature with the certificates that back it (leaf first)."""

    sig: bytes
    keyid: str = ""
    certificates: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Envelope:
    """A parsed DSSE envelope.  Nothing in it is trusted yet."""

    payload_type: str
    payload: bytes
    signatures: tuple[EnvelopeSignature, ...]


# -- DSSE --------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding, the exact bytes that are signed.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with lengths in ASCII decimal of
    the byte length, so neither field can be shifted into the other.
    """
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


def parse_envelope(data: bytes) -> Envelope:
    """Parse DSSE JSON strictly: UTF-8, no duplicate keys, bounded size and counts.

    Raises :class:`ImageManifestTooLargeError`, :class:`ImageManifestMalformedError` or
    :class:`ImageSignatureMissingError`; never anything else.
    """
    doc = _load_json(data, ImageManifestMalformedError, "manifest")
    if not isinstance(doc, dict):
        raise ImageManifestMalformedError("manifest must be a JSON object")
    payload_type = doc.get("payloadType")
    payload = doc.get("payload")
    signatures = doc.get("signatures")
    if not isinstance(payload_type, str):
        raise ImageManifestMalformedError("payloadType must be a string")
    if not isinstance(payload, str):
        raise ImageManifestMalformedError("payload must be a base64 string")
    if not isinstance(signatures, list):
        raise ImageManifestMalformedError("signatures must be a list")
    if not signatures:
        raise ImageSignatureMissingError("the envelope has no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise ImageManifestMalformedError(f"more than {MAX_SIGNATURES} signatures")
    parsed: list[EnvelopeSignature] = []
    for n, entry in enumerate(signatures, start=1):
        if not isinstance(entry, dict):
            raise ImageManifestMalformedError(f"signature {n} must be an object")
        sig = entry.get("sig")
        keyid = entry.get("keyid", "")
        certs = entry.get("certificates", [])
        if not isinstance(sig, str):
            raise ImageManifestMalformedError(f"signature {n}: sig must be a base64 string")
        if not isinstance(keyid, str):
            raise ImageManifestMalformedError(f"signature {n}: keyid must be a string")
        if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs):
            raise ImageManifestMalformedError(
                f"signature {n}: certificates must be a list of base64 strings"
            )
        if len(certs) > MAX_CERTIFICATES:
            raise ImageManifestMalformedError(
                f"signature {n}: more than {MAX_CERTIFICATES} certificates"
            )
        parsed.append(
            EnvelopeSignature(
                sig=_b64(sig, f"signature {n}: sig"),
                keyid=keyid,
                certificates=tuple(
                    _b64(c, f"signature {n}: certificate {i}") for i, c in enumerate(certs, 1)
                ),
            )
        )
    return Envelope(
        payload_type=payload_type, payload=_b64(payload, "payload"), signatures=tuple(parsed)
    )


def _b64(text: str, what: str) -> bytes:
    # DSSE allows the standard and the URL-safe alphabet, with or without padding.
    if not _B64.fullmatch(text):
        raise ImageManifestMalformedError(f"{what} is not base64")
    body = text.rstrip("=").replace("-", "+").replace("_", "/")
    if len(body) % 4 == 1:
        raise ImageManifestMalformedError(f"{what} is not base64 (bad length)")
    padding = len(text) - len(text.rstrip("="))
    if padding and (len(text) % 4 or padding != -len(body) % 4):
        raise ImageManifestMalformedError(f"{what} is not base64 (bad padding)")
    try:
        # Canonical: the unused bits of the last character are zero, so one payload has one
        # spelling per alphabet (the alphabet and the padding are DSSE's choice).
        return b64decode_strict(body, padded=False)
    except ValueError as exc:
        raise ImageManifestMalformedError(f"{what} is not canonical base64") from exc


def _load_json(data: bytes, error: type[ImageError], what: str) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise ImageManifestTooLargeError(f"{what} exceeds {MAX_ENVELOPE_BYTES} bytes")
    try:
        text = bytes(data).decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8") from exc
    except RecursionError as exc:
        raise error(f"{what} nests too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, duplicate keys, oversized integers
        raise error(f"{what} is not valid JSON ({exc})") from exc


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers that pick different duplicates would see different manifests.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- statement ---------------------------------------------------------------------------------


def build_statement(
    *,
    image_name: str,
    image_digest: str,
    version: str,
    expires_at: datetime,
    reference: ReferenceValues,
    issued_at: datetime | None = None,
) -> bytes:
    """The canonical JSON bytes of an in-toto Statement v1 for one image.

    Raises :class:`~sandboxsec.errors.InputError` for values the verifier would refuse, so a
    publisher cannot produce a manifest that can never verify.
    """
    raw = parse_digest(image_digest)
    _check_text(image_name, "image name", MAX_NAME_LENGTH, InputError)
    _check_text(version, "version", MAX_VERSION_LENGTH, InputError)
    if expires_at.tzinfo is None or (issued_at is not None and issued_at.tzinfo is None):
        raise InputError("times must be timezone-aware")
    if issued_at is not None and issued_at >= expires_at:
        raise InputError("expires_at must be after issued_at")
    predicate: dict[str, Any] = {"version": version, "expires_at": rfc3339(expires_at)}
    if issued_at is not None:
        predicate["issued_at"] = rfc3339(issued_at)
    predicate.update(reference.to_json())
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": image_name, "digest": {"sha256": raw.hex()}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": predicate,
    }
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse_statement(payload: bytes) -> Statement:
    """Validate the signed payload; raises :class:`ImageStatementInvalidError` only."""
    doc = _load_json(payload, ImageStatementInvalidError, "statement")
    bad = ImageStatementInvalidError
    _exact_keys(doc, {"_type", "subject", "predicateType", "predicate"}, set(), "statement")
    if doc["_type"] != STATEMENT_TYPE:
        raise bad(f"_type must be {STATEMENT_TYPE}")
    if doc["predicateType"] != PREDICATE_TYPE:
        raise bad(f"predicateType must be {PREDICATE_TYPE}")
    subjects = doc["subject"]
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise bad("subject must list exactly one image")
    subject = subjects[0]
    _exact_keys(subject, {"name", "digest"}, set(), "subject")
    name = _check_text(subject["name"], "subject name", MAX_NAME_LENGTH, bad)
    digests = subject["digest"]
    if not isinstance(digests, dict) or not isinstance(digests.get("sha256"), str):
        raise bad("subject digest must include sha256")
    sha = digests["sha256"]
    if len(sha) != 64 or not _HEX.fullmatch(sha):
        raise bad("subject sha256 must be 64 lowercase hex digits")

    predicate = doc["predicate"]
    _exact_keys(
        predicate, {"version", "expires_at", "pcrs"}, {"issued_at", "event_digests"}, "predicate"
    )
    version = _check_text(predicate["version"], "version", MAX_VERSION_LENGTH, bad)
    expires_at = _parse_time(predicate["expires_at"], "expires_at")
    issued_at = (
        _parse_time(predicate["issued_at"], "issued_at") if "issued_at" in predicate else None
    )
    if issued_at is not None and issued_at >= expires_at:
        raise bad("expires_at must be after issued_at")

    pcrs_doc = predicate["pcrs"]
    if not isinstance(pcrs_doc, dict):
        raise bad("pcrs must be an object of banks")
    pcrs: dict[str, dict[int, bytes]] = {}
    for bank, values in pcrs_doc.items():
        if bank not in PCR_BANKS:
            raise bad(f"unknown PCR bank {bank!r}")
        if not isinstance(values, dict):
            raise bad(f"pcrs.{bank} must be an object of PCR index to hex value")
        pcrs[bank] = {
            _parse_index(i): _parse_hex(v, PCR_BANKS[bank], f"PCR {bank}:{i}")
            for i, v in values.items()
        }
    events: dict[int, tuple[bytes, ...]] = {}
    events_doc = predicate.get("event_digests", {})
    if not isinstance(events_doc, dict):
        raise bad("event_digests must be an object of PCR index to digest lists")
    for index, digest_list in events_doc.items():
        if not isinstance(digest_list, list):
            raise bad(f"event_digests.{index} must be a list")
        events[_parse_index(index)] = tuple(
            _parse_hex(d, 32, f"event digest of PCR {index}") for d in digest_list
        )
    try:
        reference = ReferenceValues(pcrs=pcrs, event_digests=events)
    except InputError as exc:
        raise bad(exc.message) from exc
    return Statement(
        image_name=name,
        image_digest="sha256:" + sha,
        version=version,
        expires_at=expires_at,
        reference=reference,
        issued_at=issued_at,
    )


def _exact_keys(obj: object, required: set[str], optional: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise ImageStatementInvalidError(f"{what} must be an object")
    missing = required - obj.keys()
    unknown = obj.keys() - required - optional
    if missing:
        raise ImageStatementInvalidError(f"{what} lacks {', '.join(sorted(missing))}")
    if unknown:
        # Reference values decide who may run: a field this verifier does not understand
        # could be a constraint it would silently skip.
        raise ImageStatementInvalidError(f"{what} has unknown fields {', '.join(sorted(unknown))}")


def _check_text(value: object, what: str, limit: int, error: type[SandboxSecError]) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise error(f"{what} must be a non-empty string of at most {limit} characters")
    if not value.isprintable():
        # Control, format (bidi override) and separator characters could disguise the name
        # an operator reads in a terminal or a log.
        raise error(f"{what} must contain printable characters only")
    try:
        # JSON escapes can smuggle lone surrogates, which no database or log can store.
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} is not valid Unicode") from None
    return value


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ImageStatementInvalidError(f"{what} must be an RFC 3339 time with a zone")
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ImageStatementInvalidError(f"{what} is not a valid time") from exc


def _parse_index(text: str) -> int:
    if not _PCR_INDEX.fullmatch(text) or int(text) >= PCR_COUNT:
        raise ImageStatementInvalidError(
            f"PCR index {text!r} is not a decimal in 0..{PCR_COUNT - 1}"
        )
    return int(text)


def _parse_hex(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * size or not _HEX.fullmatch(value):
        raise ImageStatementInvalidError(f"{what} must be {2 * size} lowercase hex digits")
    return bytes.fromhex(value)


# -- signing -----------------------------------------------------------------------------------


def sign_manifest(
    *,
    image_name: str,
    image_digest: str,
    version: str,
    expires_at: datetime,
    reference: ReferenceValues,
    key: SigningKey,
    cert_chain: Sequence[x509.Certificate],
    issued_at: datetime | None = None,
) -> bytes:
    """Build, sign and serialize a manifest; returns the DSSE JSON bytes.

    ``cert_chain`` is the signing certificate first, then any intermediates (not the root).
    Raises :class:`ImageSigningKeyMismatchError` if ``key`` is not the certificate's key and
    :class:`ImageSignatureAlgorithmError` for keys other than ECDSA P-256 and Ed25519.
    """
    if not cert_chain:
        raise InputError("a signing certificate is required")
    _key_algorithm(key.public_key())  # refuses key types outside the pinned set
    leaf_spki = _spki(cert_chain[0].public_key())
    if _spki(key.public_key()) != leaf_spki:
        raise ImageSigningKeyMismatchError(
            "the private key does not match the signing certificate's public key"
        )
    payload = build_statement(
        image_name=image_name,
        image_digest=image_digest,
        version=version,
        expires_at=expires_at,
        reference=reference,
        issued_at=issued_at,
    )
    message = pae(PAYLOAD_TYPE, payload)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(message)
    else:
        sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode(),
        "signatures": [
            {
                "keyid": hashlib.sha256(leaf_spki).hexdigest(),
                "sig": base64.b64encode(sig).decode(),
                "certificates": [
                    base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                    for c in cert_chain
                ],
            }
        ],
    }
    return (json.dumps(envelope, indent=2) + "\n").encode()


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _key_algorithm(key: object) -> str:
    """The one signature algorithm a key type may use, or refusal."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ecdsa-p256-sha256"
    kind = type(key).__name__
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"ECDSA {key.curve.name}"
    raise ImageSignatureAlgorithmError(
        f"signing key type {kind} is not allowed (ECDSA P-256 or Ed25519)"
    )


# -- verification ------------------------------------------------------------------------------


def verify_manifest(
    envelope: bytes,
    trust: TrustStore,
    now: datetime,
    *,
    image_digest: str | None = None,
) -> VerifiedManifest:
    """Verify a manifest at instant ``now``; raises a typed error naming the first failure.

    ``image_digest`` (``sha256:<hex>``), when given, must equal the signed subject digest.
    Every error raised is a :class:`~sandboxsec.errors.SandboxSecError`: an ``image_*`` code
    from :mod:`~sandboxsec.attestation.image_errors` or a ``cert_*`` code from the chain.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    # 1. Size and shape of the envelope, before any cryptography.
    env = parse_envelope(envelope)
    manifest_digest = hashlib.sha256(envelope).hexdigest()
    # 2. The payload must claim to be an in-toto statement (it is signed under this type).
    if env.payload_type != PAYLOAD_TYPE:
        raise ImagePayloadTypeError(f"payloadType must be {PAYLOAD_TYPE}")
    # 3. An empty trust store trusts nothing.
    if trust.is_empty:
        raise ImageTrustStoreEmptyError()
    # 4. One signature must verify under a certificate that chains to a trust root.
    chain, algorithm = _verify_signatures(env, trust, now)
    # 5. Only now parse the signed statement: unsigned bytes never reach the parser.
    statement = parse_statement(env.payload)
    # 6. The manifest's own validity window.  A manifest issued after `now` did not exist
    #    then (an auditor checking a past session must not accept one signed later); a few
    #    minutes of clock skew between publisher and verifier are tolerated.
    if now >= statement.expires_at:
        raise ImageManifestExpiredError(
            f"manifest for {statement.image_name} expired at {rfc3339(statement.expires_at)}"
        )
    if statement.issued_at is not None and statement.issued_at > now + MAX_CLOCK_SKEW:
        raise ImageManifestNotYetValidError(
            f"manifest for {statement.image_name} was issued at {rfc3339(statement.issued_at)}, "
            f"after {rfc3339(now)}"
        )
    # 7. Revoked images stay revoked whoever signed them.
    if statement.image_digest in trust.revocations.image_digests:
        raise ImageDigestRevokedError(f"image {statement.image_digest} is revoked")
    # 8. The image the caller holds must be the image that was signed.
    if image_digest is not None and image_digest != statement.image_digest:
        raise ImageDigestMismatchError(
            f"image digest {image_digest} differs from the signed {statement.image_digest}"
        )
    valid_until = min(
        [statement.expires_at, chain.valid_until]
        + [c.next_update_utc for c in trust.crls if c.next_update_utc is not None]
    )
    return VerifiedManifest(
        image_name=statement.image_name,
        image_digest=statement.image_digest,
        version=statement.version,
        expires_at=statement.expires_at,
        reference=statement.reference,
        publisher=chain.subject,
        manifest_digest=manifest_digest,
        issued_at=statement.issued_at,
        publisher_root=chain.root_subject,
        signer_fingerprint=chain.fingerprint,
        signature_algorithm=algorithm,
        valid_from=max(
            [chain.valid_from]
            + ([statement.issued_at - MAX_CLOCK_SKEW] if statement.issued_at else [])
        ),
        valid_until=valid_until,
    )


def _verify_signatures(
    env: Envelope, trust: TrustStore, now: datetime
) -> tuple[VerifiedChain, str]:
    message = pae(env.payload_type, env.payload)
    first_error: SandboxSecError | None = None
    for n, signature in enumerate(env.signatures, start=1):
        try:
            return _verify_one(signature, n, message, trust, now)
        except (ImageError, CertificateChainError) as exc:
            # Any one valid signature suffices; report the first failure if none is valid.
            first_error = first_error or exc
    assert first_error is not None  # parse_envelope guarantees at least one signature
    raise first_error


def _verify_one(
    signature: EnvelopeSignature, n: int, message: bytes, trust: TrustStore, now: datetime
) -> tuple[VerifiedChain, str]:
    # a. The certificate chain: code-signing publisher, chained to a root, not revoked.
    if not signature.certificates:
        raise ImageSignatureMissingError(f"signature {n} carries no signing certificate")
    chain = verify_chain(
        signature.certificates[0],
        signature.certificates[1:],
        trust.roots,
        now,
        required_key_usage=DIGITAL_SIGNATURE,
        required_eku=CODE_SIGNING,
        revoked_serials=trust.revocations.serials,
        revoked_fingerprints=trust.revocations.fingerprints,
        crls=trust.crls,
    )
    # b. The algorithm follows from the key type alone.
    key = chain.leaf.public_key()
    algorithm = _key_algorithm(key)
    # c. The signature over PAE(payloadType, payload).
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature.sig, message)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature.sig, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ImageSignatureInvalidError(
            f"signature {n} does not verify under the key of '{chain.subject}'"
        ) from None
    return chain, algorithm


def verify_image(
    image_path: str | Path,
    envelope: bytes,
    trust: TrustStore,
    now: datetime,
) -> VerifiedManifest:
    """Verify the manifest, then stream the image file and require the signed digest.

    The manifest is checked first so a forged manifest never costs a multi-gigabyte read.
    """
    verify_manifest(envelope, trust, now)
    digest = sha256_file(image_path)
    return verify_manifest(envelope, trust, now, image_digest=digest)


class ManifestVerifier:
    """:func:`verify_manifest` with a bounded cache of successful results, keyed by digest.

    A cached result is served only inside its ``valid_from``..``valid_until`` window and is
    re-checked against ``image_digest``; one instance serves one :class:`TrustStore` (build a
    new verifier when the trust store changes).  Thread-safe.
    """

    def __init__(self, trust: TrustStore, *, max_entries: int = 1024) -> None:
        self.trust = trust
        self._max = max_entries
        self._cache: OrderedDict[str, VerifiedManifest] = OrderedDict()
        self._lock = threading.Lock()

    def verify(
        self, envelope: bytes, now: datetime, *, image_digest: str | None = None
    ) -> VerifiedManifest:
        if not isinstance(envelope, bytes | bytearray | memoryview):
            raise ImageManifestMalformedError("manifest must be bytes")
        key = hashlib.sha256(envelope).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is not None and cached.valid_from <= now < cached.valid_until:
            if image_digest is not None and image_digest != cached.image_digest:
                raise ImageDigestMismatchError(
                    f"image digest {image_digest} differs from the signed {cached.image_digest}"
                )
            return cached
        result = verify_manifest(envelope, self.trust, now, image_digest=image_digest)
        with self._lock:
            self._cache[result.manifest_digest] = result
            self._cache.move_to_end(result.manifest_digest)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return result

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
