"""Regenerate the hostile image-manifest vectors in this directory.

    .venv/bin/python tests/vectors/image/generate.py

Writes ``root.pem`` (the only trusted root), ``revocations.txt``, ``image.bin`` and one
``<name>.dsse.json`` per vector, plus ``index.json`` mapping each file to the reason code the
verifier must answer at 2026-01-01T00:00:00Z (``ok`` for the valid ones).  Private keys exist
only in memory while this runs.  ``test_image_vectors.py`` replays the directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from sandboxsec.attestation.image import PAYLOAD_TYPE  # noqa: E402
from tests.support.pki import (  # noqa: E402
    DAY,
    NOW,
    Issued,
    make_ca,
    make_leaf,
    sign_raw,
    statement_dict,
)

IMAGE = b"sandboxsec test image\n" * 512
DIGEST_HEX = hashlib.sha256(IMAGE).hexdigest()
REVOKED_IMAGE_HEX = hashlib.sha256(b"a revoked image").hexdigest()


def main() -> None:
    root = make_ca("Vector Publisher Root CA")
    issuing = make_ca("Vector Publisher Issuing CA", issuer=root)
    publisher = make_leaf(issuing, "Vector Image Publisher")
    revoked_publisher = make_leaf(issuing, "Revoked Image Publisher")
    index: dict[str, dict[str, str]] = {}

    def statement(**kw: Any) -> dict[str, Any]:
        return statement_dict(digest_hex=DIGEST_HEX, **kw)

    def signed(
        doc: dict[str, Any], signer: Issued = publisher, chain: list[Any] | None = None, **kw: Any
    ) -> bytes:
        return sign_raw(
            json.dumps(doc, sort_keys=True).encode(),
            signer,
            chain if chain is not None else [signer.cert, issuing.cert],
            **kw,
        )

    def emit(name: str, data: bytes, expect: str, about: str) -> None:
        (HERE / f"{name}.dsse.json").write_bytes(data)
        index[f"{name}.dsse.json"] = {"expect": expect, "about": about}

    def edit(data: bytes, fn: Callable[[dict[str, Any]], None]) -> bytes:
        doc = json.loads(data)
        fn(doc)
        return json.dumps(doc, indent=2).encode()

    valid = signed(statement())
    emit("valid", valid, "ok", "a correct manifest (ECDSA P-256, one intermediate)")
    ed = make_leaf(issuing, "Vector Ed25519 Publisher", key_type="ed25519")
    emit("valid-ed25519", signed(statement(), ed), "ok", "a correct manifest signed with Ed25519")

    # -- envelope encoding
    def flip_sig(doc: dict[str, Any]) -> None:
        sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
        sig[-2] ^= 0x01
        doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    emit(
        "signature-bit-flip",
        edit(valid, flip_sig),
        "image_signature_invalid",
        "one bit of sig flipped",
    )

    def flip_payload(doc: dict[str, Any]) -> None:
        payload = bytearray(base64.b64decode(doc["payload"]))
        payload[payload.index(b'"0": "') + 7] ^= 0x01  # inside the PCR 0 reference value
        doc["payload"] = base64.b64encode(bytes(payload)).decode()

    emit(
        "payload-bit-flip",
        edit(valid, flip_payload),
        "image_signature_invalid",
        "PCR 0 value changed after signing",
    )
    emit(
        "payload-type-swapped",
        edit(
            valid,
            lambda d: d.__setitem__("payloadType", "application/vnd.dev.sigstore.bundle+json"),
        ),
        "image_payload_type_unsupported",
        "payloadType is not in-toto",
    )
    evil = base64.b64encode(
        json.dumps(statement(pcrs={"sha256": {"0": "00" * 32}})).encode()
    ).decode()
    text = valid.decode()
    dup = text.replace('"payload":', f'"payload": "{evil}", "payload":', 1)
    emit(
        "duplicate-payload-key",
        dup.encode(),
        "image_manifest_malformed",
        "two payload keys: parsers would disagree",
    )
    emit(
        "deep-nesting",
        b"[" * 50_000 + b"]" * 50_000,
        "image_manifest_malformed",
        "nesting that exhausts recursion",
    )
    emit("not-utf8", b'{"payloadType": "\xff\xfe"}', "image_manifest_malformed", "invalid UTF-8")
    emit(
        "utf16",
        valid.decode().encode("utf-16"),
        "image_manifest_malformed",
        "valid JSON but UTF-16 encoded",
    )
    emit(
        "bom-prefixed", b"\xef\xbb\xbf" + valid, "image_manifest_malformed", "UTF-8 byte order mark"
    )
    emit(
        "nan-constant",
        b'{"payloadType": NaN, "payload": "", "signatures": []}',
        "image_manifest_malformed",
        "NaN",
    )
    emit(
        "huge-integer",
        b'{"payloadType": ' + b"9" * 10_000 + b"}",
        "image_manifest_malformed",
        "10k-digit integer",
    )
    emit(
        "top-level-array",
        b"[" + valid + b"]",
        "image_manifest_malformed",
        "envelope wrapped in an array",
    )
    emit(
        "payload-not-base64",
        edit(valid, lambda d: d.__setitem__("payload", "%%%" + d["payload"])),
        "image_manifest_malformed",
        "payload with characters outside base64",
    )
    emit(
        "no-signatures",
        edit(valid, lambda d: d.__setitem__("signatures", [])),
        "image_signature_missing",
        "signatures is empty",
    )
    emit(
        "signature-without-certificate",
        edit(valid, lambda d: d["signatures"][0].pop("certificates")),
        "image_signature_missing",
        "no certificate to check the signature with",
    )
    emit(
        "too-many-signatures",
        edit(valid, lambda d: d.__setitem__("signatures", d["signatures"] * 9)),
        "image_manifest_malformed",
        "more signatures than the verifier accepts",
    )

    def raw_ecdsa(doc: dict[str, Any]) -> None:
        r, s = decode_dss_signature(base64.b64decode(doc["signatures"][0]["sig"]))
        doc["signatures"][0]["sig"] = base64.b64encode(
            r.to_bytes(32, "big") + s.to_bytes(32, "big")
        ).decode()

    emit(
        "ecdsa-raw-r-s",
        edit(valid, raw_ecdsa),
        "image_signature_invalid",
        "ECDSA as r||s instead of DER",
    )

    # -- certificates
    def cert_edit(fn: Callable[[bytes], bytes]) -> Callable[[dict[str, Any]], None]:
        def apply(doc: dict[str, Any]) -> None:
            der = base64.b64decode(doc["signatures"][0]["certificates"][0])
            doc["signatures"][0]["certificates"][0] = base64.b64encode(fn(der)).decode()

        return apply

    emit(
        "certificate-trailing-byte",
        edit(valid, cert_edit(lambda d: d + b"\x00")),
        "cert_malformed",
        "leaf DER followed by a stray byte",
    )
    emit(
        "certificate-ber-length",
        edit(valid, cert_edit(lambda d: b"\x30\x83\x00" + d[2:])),
        "cert_malformed",
        "leaf outer length in non-minimal (BER) form",
    )
    emit(
        "chain-intermediate-missing",
        edit(valid, lambda d: d["signatures"][0]["certificates"].pop()),
        "cert_untrusted_issuer",
        "issuing CA certificate left out",
    )
    other_root = make_ca("Vector Publisher Root CA")  # same name, another key
    other_issuing = make_ca("Vector Publisher Issuing CA", issuer=other_root)
    impostor = make_leaf(other_issuing, "Vector Image Publisher")
    emit(
        "untrusted-publisher",
        signed(statement(), impostor, [impostor.cert, other_issuing.cert]),
        "cert_untrusted_issuer",
        "same names, CA keys not trusted",
    )
    emit(
        "forged-leaf-under-trusted-issuer",
        signed(statement(), impostor, [impostor.cert, issuing.cert]),
        "cert_signature_invalid",
        "leaf names the trusted issuing CA but another key signed it",
    )
    wrong_eku = make_leaf(issuing, "TLS Server", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    emit(
        "publisher-wrong-eku",
        signed(statement(), wrong_eku),
        "cert_eku_invalid",
        "serverAuth, not codeSigning",
    )
    no_ds = make_leaf(issuing, "Key Agreement Only", key_usage=("key_agreement",))
    emit(
        "publisher-no-digital-signature",
        signed(statement(), no_ds),
        "cert_key_usage_invalid",
        "no digitalSignature",
    )
    expired = make_leaf(
        issuing, "Expired Publisher", not_before=NOW - 400 * DAY, not_after=NOW - DAY
    )
    emit(
        "publisher-expired",
        signed(statement(), expired),
        "cert_expired",
        "signing certificate expired",
    )
    future = make_leaf(issuing, "Future Publisher", not_before=NOW + DAY)
    emit(
        "publisher-not-yet-valid",
        signed(statement(), future),
        "cert_not_yet_valid",
        "signing certificate not valid",
    )
    as_ca = make_ca(
        "CA Used As Publisher", issuer=issuing, key_usage=("key_cert_sign", "digital_signature")
    )
    emit(
        "publisher-is-a-ca",
        signed(statement(), as_ca),
        "cert_key_usage_invalid",
        "a CA certificate signs directly",
    )
    emit(
        "publisher-revoked",
        signed(statement(), revoked_publisher),
        "cert_revoked",
        "serial in revocations.txt",
    )

    # -- algorithms
    rsa_leaf = make_leaf(issuing, "RSA Publisher", key_type="rsa2048")
    emit(
        "rsa-signing-key",
        signed(statement(), rsa_leaf),
        "image_signature_algorithm_unsupported",
        "RSA not pinned",
    )
    p384 = make_leaf(issuing, "P-384 Publisher", key_type="p384")
    emit(
        "p384-signing-key",
        signed(statement(), p384),
        "image_signature_algorithm_unsupported",
        "P-384 not pinned",
    )
    emit(
        "ecdsa-sha384-hash-swap",
        signed(statement(), ecdsa_hash=hashes.SHA384()),
        "image_signature_invalid",
        "P-256 key signing a SHA-384 digest",
    )

    # -- statement
    two = statement()
    two["subject"] = two["subject"] * 2
    emit(
        "statement-two-subjects",
        signed(two),
        "image_statement_invalid",
        "two subjects: which image?",
    )
    emit(
        "statement-no-pcrs",
        signed(statement(pcrs={})),
        "image_statement_invalid",
        "no PCRs would accept any boot",
    )
    emit(
        "statement-unknown-predicate-field",
        signed(statement(require_secure_boot=False)),
        "image_statement_invalid",
        "a constraint the verifier does not know",
    )
    emit(
        "statement-pcr-wrong-length",
        signed(statement(pcrs={"sha256": {"0": "00" * 20}})),
        "image_statement_invalid",
        "a SHA-1-sized value in the sha256 bank",
    )
    emit(
        "statement-uppercase-digest",
        signed(statement_dict(digest_hex=DIGEST_HEX.upper())),
        "image_statement_invalid",
        "digest spelled in upper case",
    )
    wrong_type = statement()
    wrong_type["_type"] = "https://in-toto.io/Statement/v0.1"
    emit(
        "statement-old-type",
        signed(wrong_type),
        "image_statement_invalid",
        "in-toto Statement v0.1",
    )
    emit(
        "statement-signed-as-other-type",
        edit(
            signed(statement(), payload_type="text/plain"),
            lambda d: d.__setitem__("payloadType", PAYLOAD_TYPE),
        ),
        "image_signature_invalid",
        "signed under text/plain, relabelled in-toto",
    )
    emit(
        "manifest-expired",
        signed(statement(expires_at="2025-12-31T23:59:59Z")),
        "image_manifest_expired",
        "expired the day before",
    )
    emit(
        "manifest-issued-later",
        signed(statement(issued_at="2026-03-01T00:00:00Z")),
        "image_manifest_not_yet_valid",
        "issued two months after the verification time",
    )
    emit(
        "image-revoked",
        signed(statement_dict(digest_hex=REVOKED_IMAGE_HEX)),
        "image_digest_revoked",
        "image digest in revocations.txt",
    )
    other_image = hashlib.sha256(b"some other image").hexdigest()
    emit(
        "image-digest-mismatch",
        signed(statement_dict(digest_hex=other_image)),
        "image_digest_mismatch",
        "another image",
    )

    (HERE / "root.pem").write_bytes(root.pem)
    (HERE / "image.bin").write_bytes(IMAGE)
    (HERE / "revocations.txt").write_text(
        "# used by every vector\n"
        f"cert-serial:{revoked_publisher.serial:#x}\n"
        f"image:sha256:{REVOKED_IMAGE_HEX}\n"
    )
    (HERE / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
