"""The publisher trust store: directory layout, revocation lists, CRLs; empty means deny."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.image import sign_manifest, verify_manifest
from sandboxsec.attestation.trust import Revocations, TrustStore, load_crl, parse_revocations
from sandboxsec.errors import SandboxSecError
from tests.support.pki import NOW, make_crl, make_publisher, sample_reference

REPO = Path(__file__).resolve().parents[3]


def test_parse_revocations() -> None:
    text = """
    # comment line
    cert-serial:0x1F   # hex
    cert-serial:42
    cert-sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789
    image:sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789
    """
    rev = parse_revocations(text)
    assert rev.serials == {0x1F, 42}
    assert rev.fingerprints == {"abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"}
    assert rev.image_digests == {
        "sha256:abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
    }


@pytest.mark.parametrize(
    "line",
    [
        "cert-serial:",
        "cert-serial:-5",
        "cert-serial:0xZZ",
        "cert-serial:1_000",
        "cert-serial:\u0663",
        "cert-sha256:abc",
        "image:abcdef",
        "image:sha512:" + "ab" * 64,
        "serial:5",
        "ab" * 32,
    ],
)
def test_every_line_must_parse(line: str) -> None:
    # A typo must not silently un-revoke something.
    with pytest.raises(SandboxSecError) as info:
        parse_revocations(f"cert-serial:1\n{line}\n", source="revoked.txt")
    assert info.value.reason == "trust_store_invalid"
    assert "revoked.txt line 2" in info.value.message


def test_from_directory(tmp_path: Path) -> None:
    pub = make_publisher()
    other = make_publisher()
    publishers = tmp_path / "trust-roots" / "publishers"
    publishers.mkdir(parents=True)
    (publishers / "a.pem").write_bytes(pub.root.pem + other.root.pem)
    (publishers / "README.md").write_text("ignored: not a .pem")
    revocations = tmp_path / "revocations"
    revocations.mkdir()
    (revocations / "revoked.txt").write_text(f"cert-serial:{other.leaf.serial}\n")
    crl = make_crl(pub.intermediates[0], [])
    (revocations / "issuing.crl").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    store = TrustStore.from_directory(tmp_path)
    assert len(store.roots) == 2 and len(store.crls) == 1
    assert store.revocations.serials == {other.leaf.serial}
    assert not store.is_empty


def test_missing_directory_is_empty_and_denies(tmp_path: Path) -> None:
    store = TrustStore.from_directory(tmp_path / "nothing-here")
    assert store.is_empty
    pub = make_publisher()
    envelope = sign_manifest(
        image_name="x",
        image_digest="sha256:" + "00" * 32,
        version="1",
        expires_at=NOW.replace(year=2027),
        reference=sample_reference(),
        key=pub.leaf.key,
        cert_chain=pub.chain,
    )
    with pytest.raises(SandboxSecError) as info:
        verify_manifest(envelope, store, NOW)
    assert info.value.reason == "image_trust_store_empty"


@pytest.mark.parametrize(
    ("relative", "content"),
    [
        (
            "trust-roots/publishers/bad.pem",
            b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n",
        ),
        ("trust-roots/publishers/empty.pem", b""),
        ("revocations/bad.txt", b"what is this\n"),
        ("revocations/binary.txt", b"\xff\xfe"),
        ("revocations/bad.crl", b"not a crl"),
    ],
)
def test_malformed_files_are_errors_not_silence(
    tmp_path: Path, relative: str, content: bytes
) -> None:
    path = tmp_path / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    with pytest.raises(SandboxSecError) as info:
        TrustStore.from_directory(tmp_path)
    assert info.value.reason == "trust_store_invalid"
    assert path.name in info.value.message


def test_load_crl_der_and_pem() -> None:
    pub = make_publisher()
    crl = make_crl(pub.root, [7])
    assert load_crl(crl.public_bytes(serialization.Encoding.DER)).issuer == pub.root.cert.subject
    assert load_crl(crl.public_bytes(serialization.Encoding.PEM)).issuer == pub.root.cert.subject


def test_store_builders_and_fingerprint() -> None:
    pub = make_publisher()
    base = TrustStore.from_pem(pub.root.pem)
    assert base.roots == (pub.root.cert,)
    assert (
        base.with_revocations(Revocations(serials=frozenset({1}))).fingerprint != base.fingerprint
    )
    assert base.with_crls([make_crl(pub.root, [])]).fingerprint != base.fingerprint
    assert base.with_roots([make_publisher().root.cert]).fingerprint != base.fingerprint
    assert TrustStore.from_pem(pub.root.pem).fingerprint == base.fingerprint


def test_example_trust_dir_has_no_private_keys_and_loads() -> None:
    base = REPO / "examples" / "trust"
    for path in base.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    TrustStore.from_directory(base)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_revocation_parser_never_crashes(text: str) -> None:
    try:
        rev = parse_revocations(text)
    except SandboxSecError as exc:
        assert exc.reason == "trust_store_invalid"
    else:
        assert all(s >= 0 for s in rev.serials)
