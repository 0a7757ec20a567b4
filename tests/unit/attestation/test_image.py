"""Signed image manifests: what a valid one gives back, and the reason code of each refusal."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from sandboxsec.attestation.image import (
    PAYLOAD_TYPE,
    ManifestVerifier,
    ReferenceValues,
    VerifiedManifest,
    build_statement,
    pae,
    parse_envelope,
    parse_statement,
    sign_manifest,
    verify_image,
    verify_manifest,
)
from sandboxsec.attestation.trust import Revocations, TrustStore
from sandboxsec.errors import InputError, SandboxSecError
from tests.support.pki import (
    DAY,
    NOW,
    Publisher,
    make_ca,
    make_crl,
    make_leaf,
    make_publisher,
    sample_reference,
    sign_raw,
    statement_dict,
)

IMAGE = b"a tiny stand-in for a many-gigabyte VM image\n" * 1000
IMAGE_DIGEST = "sha256:" + hashlib.sha256(IMAGE).hexdigest()
EXPIRES = NOW + 30 * DAY


@pytest.fixture(scope="module")
def publisher() -> Publisher:
    return make_publisher("p256")


@pytest.fixture(scope="module")
def manifest(publisher: Publisher) -> bytes:
    return _sign(publisher)


def _sign(pub: Publisher, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "image_name": "images/sandbox.qcow2",
        "image_digest": IMAGE_DIGEST,
        "version": "1.4.2",
        "expires_at": EXPIRES,
        "issued_at": NOW - DAY,
        "reference": sample_reference(),
        "key": pub.leaf.key,
        "cert_chain": pub.chain,
    }
    fields.update(overrides)
    return sign_manifest(**fields)  # type: ignore[arg-type]


def _refused(code: str, envelope: bytes, trust: TrustStore, **kwargs: object) -> SandboxSecError:
    with pytest.raises(SandboxSecError) as info:
        verify_manifest(envelope, trust, kwargs.pop("now", NOW), **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == code, info.value
    return info.value


def _mutate(envelope: bytes, fn: object) -> bytes:
    doc = json.loads(envelope)
    fn(doc)  # type: ignore[operator]
    return json.dumps(doc).encode()


# -- the happy path ----------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
@pytest.mark.parametrize("with_intermediate", [True, False])
def test_sign_then_verify(key_type: str, with_intermediate: bool) -> None:
    pub = make_publisher(key_type, with_intermediate=with_intermediate)  # type: ignore[arg-type]
    envelope = _sign(pub)
    result = verify_manifest(envelope, pub.trust(), NOW, image_digest=IMAGE_DIGEST)
    assert isinstance(result, VerifiedManifest)
    assert result.image_name == "images/sandbox.qcow2"
    assert result.image_digest == IMAGE_DIGEST
    assert result.version == "1.4.2"
    assert result.expires_at == EXPIRES
    assert result.issued_at == NOW - DAY
    assert result.reference == sample_reference()
    assert result.publisher == "CN=Test Image Publisher"
    assert result.publisher_root == "CN=Test Publisher Root CA"
    assert result.manifest_digest == hashlib.sha256(envelope).hexdigest()
    assert (
        result.signature_algorithm == {"p256": "ecdsa-p256-sha256", "ed25519": "ed25519"}[key_type]
    )
    assert result.signer_fingerprint == pub.leaf.fingerprint
    assert result.valid_until == EXPIRES


def test_envelope_is_dsse_with_in_toto_statement(manifest: bytes) -> None:
    doc = json.loads(manifest)
    assert doc["payloadType"] == "application/vnd.in-toto+json"
    statement = json.loads(base64.b64decode(doc["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"] == [
        {"name": "images/sandbox.qcow2", "digest": {"sha256": IMAGE_DIGEST.removeprefix("sha256:")}}
    ]
    predicate = statement["predicate"]
    assert predicate["pcrs"]["sha256"]["0"] == hashlib.sha256(b"firmware").hexdigest()
    assert predicate["event_digests"] == {"4": [hashlib.sha256(b"kernel event").hexdigest()]}
    assert predicate["expires_at"] == "2026-01-31T00:00:00Z"
    (sig,) = doc["signatures"]
    assert len(sig["certificates"]) == 2 and len(sig["keyid"]) == 64


def test_pae_matches_the_dsse_specification() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "
    # Lengths count bytes, not characters.
    assert pae("t\u00e9", b"x") == b"DSSEv1 3 t\xc3\xa9 1 x"


def test_verify_image_streams_the_file(
    tmp_path: Path, publisher: Publisher, manifest: bytes
) -> None:
    image = tmp_path / "sandbox.qcow2"
    image.write_bytes(IMAGE)
    assert verify_image(image, manifest, publisher.trust(), NOW).image_digest == IMAGE_DIGEST


def test_any_one_valid_signature_suffices(publisher: Publisher, manifest: bytes) -> None:
    stranger = make_publisher()
    foreign = json.loads(_sign(stranger, version="9.9.9"))["signatures"][0]
    both = _mutate(manifest, lambda d: d["signatures"].insert(0, foreign))
    assert verify_manifest(both, publisher.trust(), NOW).publisher == "CN=Test Image Publisher"
    # The stranger's signature alone is refused with the first failure's reason.
    only_foreign = _mutate(manifest, lambda d: d.__setitem__("signatures", [foreign]))
    _refused("image_signature_invalid", only_foreign, stranger.trust())
    _refused("cert_untrusted_issuer", only_foreign, publisher.trust())


def test_url_safe_base64_and_missing_padding_are_accepted(
    publisher: Publisher, manifest: bytes
) -> None:
    def urlsafe(doc: dict[str, object]) -> None:
        doc["payload"] = str(doc["payload"]).replace("+", "-").replace("/", "_").rstrip("=")

    verify_manifest(_mutate(manifest, urlsafe), publisher.trust(), NOW)


# -- signature and envelope --------------------------------------------------------------------


def test_flipped_bit_in_signature(publisher: Publisher, manifest: bytes) -> None:
    def flip(doc: dict[str, list[dict[str, str]]]) -> None:
        sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
        sig[-1] ^= 0x01
        doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()

    _refused("image_signature_invalid", _mutate(manifest, flip), publisher.trust())


@pytest.mark.parametrize("position", [0, 40, -3])
def test_flipped_bit_in_payload(publisher: Publisher, manifest: bytes, position: int) -> None:
    def flip(doc: dict[str, str]) -> None:
        payload = bytearray(base64.b64decode(doc["payload"]))
        payload[position] ^= 0x04
        doc["payload"] = base64.b64encode(bytes(payload)).decode()

    _refused("image_signature_invalid", _mutate(manifest, flip), publisher.trust())


def test_payload_type_is_bound(publisher: Publisher, manifest: bytes) -> None:
    other = _mutate(manifest, lambda d: d.__setitem__("payloadType", "application/json"))
    _refused("image_payload_type_unsupported", other, publisher.trust())


def test_signature_over_another_payload_type_does_not_transfer(publisher: Publisher) -> None:
    payload = json.dumps(statement_dict(digest_hex=IMAGE_DIGEST[7:])).encode()
    signed_as_other = sign_raw(payload, publisher.leaf, publisher.chain, payload_type="text/plain")
    relabelled = _mutate(signed_as_other, lambda d: d.__setitem__("payloadType", PAYLOAD_TYPE))
    _refused("image_signature_invalid", relabelled, publisher.trust())


def test_ecdsa_with_another_hash_is_refused(publisher: Publisher) -> None:
    # The key type decides the hash: a P-256 signature over SHA-384 is not accepted.
    payload = json.dumps(statement_dict(digest_hex=IMAGE_DIGEST[7:])).encode()
    envelope = sign_raw(payload, publisher.leaf, publisher.chain, ecdsa_hash=hashes.SHA384())
    _refused("image_signature_invalid", envelope, publisher.trust())
    verify_manifest(sign_raw(payload, publisher.leaf, publisher.chain), publisher.trust(), NOW)


@pytest.mark.parametrize("key_type", ["rsa2048", "p384"])
def test_signing_key_types_outside_the_pin(key_type: str) -> None:
    pub = make_publisher(key_type)  # type: ignore[arg-type]
    payload = json.dumps(statement_dict()).encode()
    _refused(
        "image_signature_algorithm_unsupported", sign_raw(payload, pub.leaf, pub.chain), pub.trust()
    )
    with pytest.raises(SandboxSecError) as info:
        _sign(pub)
    assert info.value.reason == "image_signature_algorithm_unsupported"


def test_signing_with_a_key_that_is_not_the_certificate(publisher: Publisher) -> None:
    other = make_publisher()
    with pytest.raises(InputError) as info:
        _sign(publisher, key=other.leaf.key)
    assert info.value.reason == "image_signing_key_mismatch"


def test_no_signatures_or_no_certificate(publisher: Publisher, manifest: bytes) -> None:
    _refused(
        "image_signature_missing",
        _mutate(manifest, lambda d: d.__setitem__("signatures", [])),
        publisher.trust(),
    )
    no_cert = _mutate(manifest, lambda d: d["signatures"][0].pop("certificates"))
    _refused("image_signature_missing", no_cert, publisher.trust())


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "image_manifest_malformed"),
        (b"[]", "image_manifest_malformed"),
        (b"\xff\xfe{}", "image_manifest_malformed"),
        (b'{"payloadType": 1, "payload": "", "signatures": []}', "image_manifest_malformed"),
        (
            b'{"payloadType": "x", "payload": "!!", "signatures": [{"sig": ""}]}',
            "image_manifest_malformed",
        ),
        (b'{"payloadType": "x", "payload": "", "signatures": {}}', "image_manifest_malformed"),
        (
            b'{"payloadType": "x", "payload": "", "signatures": [{"sig": 5}]}',
            "image_manifest_malformed",
        ),
        (b'{"payloadType": "x", "payload": "", "signatures": [1]}', "image_manifest_malformed"),
        (
            b'{"payloadType": "x", "payload": "", "signatures": [], "payload": ""}',
            "image_manifest_malformed",
        ),
        (
            b'{"payloadType": "x", "payload": "A", "signatures": [{"sig": ""}]}',
            "image_manifest_malformed",
        ),
        (b'{"payloadType": NaN}', "image_manifest_malformed"),
        (b"[" * 100_000 + b"]" * 100_000, "image_manifest_malformed"),
        (b'{"a": ' + b"9" * 5000 + b"}", "image_manifest_malformed"),
        (b" " * (1024 * 1024 + 1), "image_manifest_too_large"),
    ],
)
def test_malformed_envelopes(publisher: Publisher, data: bytes, code: str) -> None:
    _refused(code, data, publisher.trust())


def test_too_many_signatures(publisher: Publisher, manifest: bytes) -> None:
    many = _mutate(manifest, lambda d: d.__setitem__("signatures", d["signatures"] * 9))
    _refused("image_manifest_malformed", many, publisher.trust())


def test_too_large_is_a_413(publisher: Publisher) -> None:
    err = _refused("image_manifest_too_large", b"{" + b" " * (1024 * 1024), publisher.trust())
    assert err.status == 413


# -- certificates ------------------------------------------------------------------------------


def test_untrusted_publisher(manifest: bytes) -> None:
    _refused("cert_untrusted_issuer", manifest, make_publisher().trust())


def test_empty_trust_store_denies(manifest: bytes) -> None:
    _refused("image_trust_store_empty", manifest, TrustStore())


def test_revoked_publisher_certificate(publisher: Publisher, manifest: bytes) -> None:
    by_serial = publisher.trust(Revocations(serials=frozenset({publisher.leaf.serial})))
    _refused("cert_revoked", manifest, by_serial)
    by_fingerprint = publisher.trust(
        Revocations(fingerprints=frozenset({publisher.leaf.fingerprint}))
    )
    _refused("cert_revoked", manifest, by_fingerprint)
    crl = make_crl(publisher.intermediates[0], [publisher.leaf.serial])
    _refused("cert_revoked", manifest, publisher.trust().with_crls([crl]))


def test_revoked_issuing_ca(publisher: Publisher, manifest: bytes) -> None:
    crl = make_crl(publisher.root, [publisher.intermediates[0].serial])
    err = _refused("cert_revoked", manifest, publisher.trust().with_crls([crl]))
    assert "Issuing CA" in err.message


def test_expired_publisher_certificate() -> None:
    pub = make_publisher(not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    _refused("cert_expired", _sign(pub), pub.trust())


def test_publisher_certificate_without_code_signing() -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    pub = make_publisher(eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
    _refused("cert_eku_invalid", _sign(pub), pub.trust())
    no_ds = make_publisher(key_usage=("key_agreement",))
    _refused("cert_key_usage_invalid", _sign(no_ds), no_ds.trust())


def test_certificate_bytes_tampered(publisher: Publisher, manifest: bytes) -> None:
    def flip(doc: dict[str, list[dict[str, list[str]]]]) -> None:
        der = bytearray(base64.b64decode(doc["signatures"][0]["certificates"][0]))
        der[len(der) // 2] ^= 0x10
        doc["signatures"][0]["certificates"][0] = base64.b64encode(bytes(der)).decode()

    with pytest.raises(SandboxSecError) as info:
        verify_manifest(_mutate(manifest, flip), publisher.trust(), NOW)
    assert info.value.reason.startswith("cert_") or info.value.reason == "image_signature_invalid"


def test_swapped_leaf_certificate_with_same_name() -> None:
    # A different key under the same publisher name, issued by another CA: refused by the chain.
    pub = make_publisher()
    mallory_ca = make_ca("Test Publisher Issuing CA")
    mallory = make_leaf(mallory_ca)
    forged = sign_raw(
        json.dumps(statement_dict()).encode(), mallory, [mallory.cert, pub.intermediates[0].cert]
    )
    _refused("cert_signature_invalid", forged, pub.trust())


# -- statement ---------------------------------------------------------------------------------


def test_expired_manifest(publisher: Publisher, manifest: bytes) -> None:
    err = _refused("image_manifest_expired", manifest, publisher.trust(), now=EXPIRES)
    assert "2026-01-31T00:00:00Z" in err.message
    verify_manifest(manifest, publisher.trust(), EXPIRES - timedelta(seconds=1))


def test_manifest_issued_after_now(publisher: Publisher) -> None:
    later = _sign(publisher, issued_at=NOW + timedelta(hours=1))
    err = _refused("image_manifest_not_yet_valid", later, publisher.trust())
    assert "issued at" in err.message
    # Clock skew of a few minutes is tolerated.
    verify_manifest(_sign(publisher, issued_at=NOW + timedelta(minutes=4)), publisher.trust(), NOW)
    verify_manifest(later, publisher.trust(), NOW + timedelta(hours=1))
    # The cache does not answer for instants before issued_at either.
    verifier = ManifestVerifier(publisher.trust())
    verifier.verify(later, NOW + timedelta(hours=2))
    with pytest.raises(SandboxSecError) as info:
        verifier.verify(later, NOW)
    assert info.value.reason == "image_manifest_not_yet_valid"


def test_revoked_image_digest(publisher: Publisher, manifest: bytes) -> None:
    trust = publisher.trust(Revocations(image_digests=frozenset({IMAGE_DIGEST})))
    _refused("image_digest_revoked", manifest, trust)


def test_image_digest_mismatch(tmp_path: Path, publisher: Publisher, manifest: bytes) -> None:
    _refused(
        "image_digest_mismatch", manifest, publisher.trust(), image_digest="sha256:" + "00" * 32
    )
    tampered = bytearray(IMAGE)
    tampered[12345] ^= 0x01
    image = tmp_path / "tampered.qcow2"
    image.write_bytes(bytes(tampered))
    with pytest.raises(SandboxSecError) as info:
        verify_image(image, manifest, publisher.trust(), NOW)
    assert info.value.reason == "image_digest_mismatch"


def test_missing_image_file(tmp_path: Path, publisher: Publisher, manifest: bytes) -> None:
    with pytest.raises(SandboxSecError) as info:
        verify_image(tmp_path / "absent.qcow2", manifest, publisher.trust(), NOW)
    assert info.value.reason == "image_unreadable"


@pytest.mark.parametrize(
    "change",
    [
        {"_type": "https://in-toto.io/Statement/v0.1"},
        {"predicateType": "https://slsa.dev/provenance/v1"},
        {"subject": []},
        {"subject": [{"name": "a", "digest": {"sha256": "ab" * 32}}] * 2},
        {"subject": [{"name": "", "digest": {"sha256": "ab" * 32}}]},
        {"subject": [{"name": "a\nb", "digest": {"sha256": "ab" * 32}}]},
        {"subject": [{"name": "a\ud800b", "digest": {"sha256": "ab" * 32}}]},
        {"subject": [{"name": "evil\u202egpj.exe", "digest": {"sha256": "ab" * 32}}]},
        {"subject": [{"name": "a", "digest": {"sha512": "ab" * 64}}]},
        {"subject": [{"name": "a", "digest": {"sha256": "AB" * 32}}]},
        {"subject": [{"name": "a", "digest": {"sha256": "ab" * 31}}]},
        {"extra": 1},
    ],
)
def test_statement_shape(publisher: Publisher, change: dict[str, object]) -> None:
    doc = statement_dict()
    doc.update(change)
    envelope = sign_raw(json.dumps(doc).encode(), publisher.leaf, publisher.chain)
    _refused("image_statement_invalid", envelope, publisher.trust())


@pytest.mark.parametrize(
    "predicate",
    [
        {"pcrs": {}},
        {"pcrs": {"sha256": {}}},
        {"pcrs": {"md5": {"0": "00" * 16}}},
        {"pcrs": {"sha256": {"24": "00" * 32}}},
        {"pcrs": {"sha256": {"01": "00" * 32}}},
        {"pcrs": {"sha256": {"-1": "00" * 32}}},
        {"pcrs": {"sha256": {"0": "00" * 20}}},
        {"pcrs": {"sha1": {"0": "00" * 32}}},
        {"pcrs": {"sha256": {"0": "zz" * 32}}},
        {"pcrs": {"sha256": {"0": 0}}},
        {"pcrs": ["sha256"]},
        {"event_digests": {"4": []}},
        {"event_digests": {"4": ["00" * 20]}},
        {"event_digests": {"4": "00"}},
        {"event_digests": []},
        {"expires_at": "2026-06-01"},
        {"expires_at": "2026-06-01T00:00:00"},
        {"expires_at": "2026-13-01T00:00:00Z"},
        {"expires_at": 1767225600},
        {"issued_at": "2026-07-01T00:00:00Z"},
        {"version": ""},
        {"version": "v" * 200},
        {"version": "\udfff"},
        {"require_secure_boot": False},
    ],
)
def test_predicate_values(publisher: Publisher, predicate: dict[str, object]) -> None:
    envelope = sign_raw(
        json.dumps(statement_dict(**predicate)).encode(), publisher.leaf, publisher.chain
    )
    _refused("image_statement_invalid", envelope, publisher.trust())


def test_statement_with_offset_times_is_normalised_to_utc(publisher: Publisher) -> None:
    doc = statement_dict(expires_at="2026-06-01T02:00:00+02:00")
    envelope = sign_raw(json.dumps(doc).encode(), publisher.leaf, publisher.chain)
    result = verify_manifest(envelope, publisher.trust(), NOW)
    assert result.expires_at.isoformat() == "2026-06-01T00:00:00+00:00"


def test_statement_roundtrip() -> None:
    raw = build_statement(
        image_name="img",
        image_digest=IMAGE_DIGEST,
        version="2",
        expires_at=EXPIRES,
        reference=sample_reference(),
    )
    parsed = parse_statement(raw)
    assert parsed.image_digest == IMAGE_DIGEST and parsed.issued_at is None
    assert parsed.reference == sample_reference()


def test_build_statement_refuses_what_would_never_verify() -> None:
    base = {
        "image_name": "img",
        "image_digest": IMAGE_DIGEST,
        "version": "1",
        "expires_at": EXPIRES,
        "reference": sample_reference(),
    }
    for change in (
        {"image_digest": "sha256:XYZ"},
        {"image_digest": IMAGE_DIGEST.upper()},
        {"image_name": ""},
        {"expires_at": EXPIRES.replace(tzinfo=None)},
        {"issued_at": EXPIRES},
    ):
        with pytest.raises(InputError):
            build_statement(**{**base, **change})  # type: ignore[arg-type]


def test_reference_values_validation() -> None:
    ok = ReferenceValues(pcrs={"sha1": {7: b"\x00" * 20}})
    assert ok.event_digests == {}
    for bad in (
        {"pcrs": {}},
        {"pcrs": {"sha256": {}}},
        {"pcrs": {"sha3": {0: b"\x00" * 32}}},
        {"pcrs": {"sha256": {24: b"\x00" * 32}}},
        {"pcrs": {"sha256": {True: b"\x00" * 32}}},
        {"pcrs": {"sha256": {0: b"\x00" * 31}}},
        {"pcrs": {"sha256": {0: b"\x00" * 32}}, "event_digests": {0: ()}},
        {"pcrs": {"sha256": {0: b"\x00" * 32}}, "event_digests": {0: (b"\x00",)}},
    ):
        with pytest.raises(InputError):
            ReferenceValues(**bad)  # type: ignore[arg-type]
    frozen = ReferenceValues(pcrs={"sha256": {0: b"\x00" * 32}})
    with pytest.raises(TypeError):
        frozen.pcrs["sha256"][1] = b"\x00" * 32  # type: ignore[index]


def test_parse_envelope_shape(manifest: bytes) -> None:
    env = parse_envelope(manifest)
    assert env.payload_type == PAYLOAD_TYPE
    assert len(env.signatures) == 1 and len(env.signatures[0].certificates) == 2


# -- the cache ---------------------------------------------------------------------------------


def test_manifest_verifier_caches_within_the_validity_window(
    publisher: Publisher, manifest: bytes
) -> None:
    verifier = ManifestVerifier(publisher.trust(), max_entries=2)
    first = verifier.verify(manifest, NOW)
    assert verifier.verify(manifest, NOW + DAY) is first
    # The image digest is still compared on a cache hit.
    with pytest.raises(SandboxSecError) as info:
        verifier.verify(manifest, NOW, image_digest="sha256:" + "00" * 32)
    assert info.value.reason == "image_digest_mismatch"
    # After expiry the cache is not consulted: the manifest is refused.
    with pytest.raises(SandboxSecError) as info:
        verifier.verify(manifest, EXPIRES)
    assert info.value.reason == "image_manifest_expired"
    # Failures are not cached, and the cache stays bounded.
    for _ in range(3):
        verifier.verify(_sign(publisher, version="other"), NOW)
    assert verifier.verify(manifest, NOW) is not first
    verifier.clear()


def test_trust_store_fingerprint_tracks_revocations(publisher: Publisher) -> None:
    a = publisher.trust()
    b = publisher.trust(Revocations(serials=frozenset({1})))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == publisher.trust().fingerprint


def test_results_are_hashable_values(publisher: Publisher, manifest: bytes) -> None:
    a = verify_manifest(manifest, publisher.trust(), NOW)
    b = verify_manifest(bytearray(manifest), publisher.trust(), NOW)
    assert a == b and hash(a) == hash(b)
    assert len({sample_reference(), sample_reference()}) == 1


def test_non_bytes_input_is_malformed(publisher: Publisher) -> None:
    _refused("image_manifest_malformed", "{}", publisher.trust())  # type: ignore[arg-type]
    with pytest.raises(SandboxSecError) as info:
        ManifestVerifier(publisher.trust()).verify("{}", NOW)  # type: ignore[arg-type]
    assert info.value.reason == "image_manifest_malformed"
