"""Certificate chains: every refusal names the failing certificate and carries its reason code."""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sandboxsec.attestation.image_errors import CertificateChainError
from sandboxsec.attestation.x509chain import (
    CODE_SIGNING,
    certificate_fingerprint,
    load_certificate,
    load_pem_certificates,
    verify_chain,
)
from tests.support.pki import DAY, NOW, Issued, make_ca, make_crl, make_leaf


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca("Root CA")


@pytest.fixture(scope="module")
def inter(root: Issued) -> Issued:
    return make_ca("Issuing CA", issuer=root)


@pytest.fixture(scope="module")
def leaf(inter: Issued) -> Issued:
    return make_leaf(inter, "Publisher")


def _fails(
    code: str, *args: object, position: str | None = None, **kwargs: object
) -> CertificateChainError:
    with pytest.raises(CertificateChainError) as info:
        verify_chain(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == code, info.value
    if position is not None:
        assert info.value.certificate is not None
        assert info.value.certificate.position == position, info.value
    return info.value


# -- what passes -------------------------------------------------------------------------------


def test_valid_chain_returns_path_leaf_to_root(root: Issued, inter: Issued, leaf: Issued) -> None:
    chain = verify_chain(leaf.der, [inter.der], [root.cert], NOW, required_eku=CODE_SIGNING)
    assert [c.subject for c in chain.path] == [
        leaf.cert.subject,
        inter.cert.subject,
        root.cert.subject,
    ]
    assert chain.subject == "CN=Publisher"
    assert chain.root_subject == "CN=Root CA"
    assert (
        chain.fingerprint
        == hashlib.sha256(leaf.der).hexdigest()
        == certificate_fingerprint(leaf.cert)
    )
    assert chain.valid_until == min(c.not_valid_after_utc for c in chain.path)


def test_intermediates_in_any_order_with_unrelated_ones(
    root: Issued, inter: Issued, leaf: Issued
) -> None:
    stranger = make_ca("Some Other CA")
    chain = verify_chain(leaf.der, [stranger.der, inter.der, root.der], [root.cert], NOW)
    assert len(chain.path) == 3


def test_leaf_issued_directly_by_root(root: Issued) -> None:
    direct = make_leaf(root, "Direct")
    assert len(verify_chain(direct.der, [], [root.cert], NOW).path) == 2


@pytest.mark.parametrize("key_type", ["p256", "p384", "ed25519", "rsa2048"])
def test_leaf_key_types(root: Issued, key_type: str) -> None:
    issued = make_leaf(root, f"Leaf {key_type}", key_type=key_type)  # type: ignore[arg-type]
    verify_chain(issued.der, [], [root.cert], NOW)


@pytest.mark.parametrize("ca_type", ["ed25519", "rsa2048", "p384"])
def test_ca_key_types(ca_type: str) -> None:
    ca = make_ca(f"CA {ca_type}", key_type=ca_type)  # type: ignore[arg-type]
    verify_chain(make_leaf(ca).der, [], [ca.cert], NOW)


def test_missing_eku_is_accepted_unless_required(root: Issued) -> None:
    no_eku = make_leaf(root, "No EKU", eku=None)
    verify_chain(no_eku.der, [], [root.cert], NOW, required_eku=CODE_SIGNING)
    _fails(
        "cert_eku_invalid",
        no_eku.der,
        [],
        [root.cert],
        NOW,
        required_eku=CODE_SIGNING,
        eku_required=True,
    )


# -- path building -----------------------------------------------------------------------------


def test_untrusted_root_with_a_trusted_name(inter: Issued, leaf: Issued) -> None:
    other_root = make_ca("Root CA")  # same name, different key
    err = _fails(
        "cert_untrusted_issuer",
        leaf.der,
        [inter.der],
        [other_root.cert],
        NOW,
        position="intermediate 1",
    )
    assert "Issuing CA" in err.message and "name of a trust root" in err.message


def test_unknown_issuer(leaf: Issued) -> None:
    unrelated = make_ca("Unrelated Root")
    err = _fails("cert_untrusted_issuer", leaf.der, [], [unrelated.cert], NOW, position="leaf")
    assert "CN=Issuing CA" in err.message


def test_missing_intermediate(root: Issued, leaf: Issued) -> None:
    _fails("cert_untrusted_issuer", leaf.der, [], [root.cert], NOW, position="leaf")


def test_no_trust_roots_at_all(inter: Issued, leaf: Issued) -> None:
    _fails("cert_untrusted_issuer", leaf.der, [inter.der], [], NOW)


def test_forged_issuer_signature(root: Issued, inter: Issued) -> None:
    forged = make_leaf(inter, "Forged", signer_key=make_ca("Mallory").key)
    _fails("cert_signature_invalid", forged.der, [inter.der], [root.cert], NOW, position="leaf")


def test_too_many_intermediates(root: Issued, leaf: Issued) -> None:
    _fails("cert_chain_too_long", leaf.der, [root.der] * 9, [root.cert], NOW)


def test_chain_deeper_than_the_limit(root: Issued) -> None:
    issuer, extra = root, []
    for i in range(4):
        issuer = make_ca(f"Level {i}", issuer=issuer)
        extra.append(issuer.der)
    deep = make_leaf(issuer, "Deep")
    verify_chain(deep.der, extra, [root.cert], NOW)
    _fails("cert_chain_too_long", deep.der, extra, [root.cert], NOW, max_intermediates=3)


def test_leaf_that_is_a_pinned_root_but_not_an_end_entity(root: Issued) -> None:
    _fails("cert_key_usage_invalid", root.der, [], [root.cert], NOW)


# -- encoding ----------------------------------------------------------------------------------


def test_trailing_byte_is_not_der(root: Issued, leaf: Issued) -> None:
    _fails("cert_malformed", leaf.der + b"\x00", [], [root.cert], NOW, position="leaf")


def test_non_minimal_length_is_not_der(root: Issued, inter: Issued, leaf: Issued) -> None:
    der = leaf.der
    assert der[0] == 0x30 and der[1] == 0x82
    ber = b"\x30\x83\x00" + der[2:]  # same length, encoded in one byte more: valid BER, not DER
    err = _fails("cert_malformed", ber, [inter.der], [root.cert], NOW, position="leaf")
    assert "DER" in err.message
    _fails("cert_malformed", leaf.der, [b"\x30\x83\x00" + inter.der[2:]], [root.cert], NOW)


def test_garbage_and_empty(root: Issued) -> None:
    for junk in (b"", b"\x30", b"not a certificate", bytes(2000)):
        _fails("cert_malformed", junk, [], [root.cert], NOW)


def test_oversized_certificate(root: Issued) -> None:
    _fails("cert_malformed", b"\x30" * (64 * 1024 + 1), [], [root.cert], NOW)


def test_load_pem_bundle(root: Issued, inter: Issued) -> None:
    certs = load_pem_certificates(root.pem + inter.pem)
    assert [c.subject for c in certs] == [root.cert.subject, inter.cert.subject]
    with pytest.raises(CertificateChainError) as info:
        load_pem_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert info.value.reason == "cert_malformed"
    with pytest.raises(CertificateChainError):
        load_pem_certificates(b"")


def test_load_certificate_roundtrip(leaf: Issued) -> None:
    assert load_certificate(leaf.der).serial_number == leaf.serial


# -- validity windows --------------------------------------------------------------------------


def test_expired_leaf(root: Issued) -> None:
    old = make_leaf(root, "Old", not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    err = _fails("cert_expired", old.der, [], [root.cert], NOW, position="leaf")
    assert "CN=Old" in err.message and f"{old.serial:#x}" in err.message


def test_not_yet_valid_leaf(root: Issued) -> None:
    early = make_leaf(root, "Early", not_before=NOW + DAY)
    _fails("cert_not_yet_valid", early.der, [], [root.cert], NOW, position="leaf")


def test_expired_intermediate(root: Issued) -> None:
    old_ca = make_ca("Old CA", issuer=root, not_before=NOW - 900 * DAY, not_after=NOW - DAY)
    issued = make_leaf(old_ca, not_before=NOW - 800 * DAY)
    _fails("cert_expired", issued.der, [old_ca.der], [root.cert], NOW, position="intermediate 1")


def test_expired_root() -> None:
    old_root = make_ca("Old Root", not_before=NOW - 900 * DAY, not_after=NOW - DAY)
    issued = make_leaf(old_root, not_before=NOW - 800 * DAY)
    _fails("cert_expired", issued.der, [], [old_root.cert], NOW, position="root")


def test_validity_boundaries_are_inclusive(root: Issued) -> None:
    cert = make_leaf(root, "Edge", not_before=NOW - DAY, not_after=NOW + DAY)
    verify_chain(cert.der, [], [root.cert], NOW - DAY)
    verify_chain(cert.der, [], [root.cert], NOW + DAY)
    _fails("cert_expired", cert.der, [], [root.cert], NOW + DAY + DAY / 86400)


def test_naive_now_is_a_programming_error(root: Issued, leaf: Issued) -> None:
    with pytest.raises(ValueError):
        verify_chain(leaf.der, [], [root.cert], NOW.replace(tzinfo=None))


# -- revocation --------------------------------------------------------------------------------


def test_revoked_leaf_serial(root: Issued, inter: Issued, leaf: Issued) -> None:
    _fails(
        "cert_revoked",
        leaf.der,
        [inter.der],
        [root.cert],
        NOW,
        revoked_serials={leaf.serial},
        position="leaf",
    )


def test_revoked_intermediate_fingerprint(root: Issued, inter: Issued, leaf: Issued) -> None:
    _fails(
        "cert_revoked",
        leaf.der,
        [inter.der],
        [root.cert],
        NOW,
        revoked_fingerprints={inter.fingerprint.upper()},
        position="intermediate 1",
    )


def test_crl_of_the_issuer(root: Issued, inter: Issued, leaf: Issued) -> None:
    ok = make_crl(inter, [leaf.serial + 1])
    verify_chain(leaf.der, [inter.der], [root.cert], NOW, crls=[ok])
    revoking = make_crl(inter, [leaf.serial])
    _fails(
        "cert_revoked", leaf.der, [inter.der], [root.cert], NOW, crls=[revoking], position="leaf"
    )


def test_crl_revoking_the_intermediate(root: Issued, inter: Issued, leaf: Issued) -> None:
    crl = make_crl(root, [inter.serial])
    _fails(
        "cert_revoked",
        leaf.der,
        [inter.der],
        [root.cert],
        NOW,
        crls=[crl],
        position="intermediate 1",
    )


def test_forged_crl(root: Issued, inter: Issued, leaf: Issued) -> None:
    forged = make_crl(inter, [], signer_key=make_ca("Mallory").key)
    _fails("cert_crl_invalid", leaf.der, [inter.der], [root.cert], NOW, crls=[forged])


def test_stale_crl_fails_closed(root: Issued, inter: Issued, leaf: Issued) -> None:
    stale = make_crl(inter, [], this_update=NOW - 30 * DAY, next_update=NOW - DAY)
    _fails("cert_crl_invalid", leaf.der, [inter.der], [root.cert], NOW, crls=[stale])


# -- CA constraints ----------------------------------------------------------------------------


def test_issuer_that_is_not_a_ca(root: Issued) -> None:
    fake_ca = make_leaf(root, "Not A CA", key_usage=("digital_signature", "key_cert_sign"))
    issued = make_leaf(fake_ca, "Under Fake")
    _fails("cert_not_ca", issued.der, [fake_ca.der], [root.cert], NOW, position="intermediate 1")


def test_issuer_without_basic_constraints(root: Issued) -> None:
    fake_ca = make_ca("No BC", issuer=root, ca=None)
    _fails("cert_not_ca", make_leaf(fake_ca).der, [fake_ca.der], [root.cert], NOW)


def test_issuer_without_key_cert_sign(root: Issued) -> None:
    weak_ca = make_ca("CRL Only CA", issuer=root, key_usage=("crl_sign",))
    _fails(
        "cert_not_ca",
        make_leaf(weak_ca).der,
        [weak_ca.der],
        [root.cert],
        NOW,
        position="intermediate 1",
    )


def test_path_length_constraint() -> None:
    top = make_ca("PathLen0 Root", path_length=0)
    mid = make_ca("Mid", issuer=top)
    issued = make_leaf(mid)
    _fails("cert_path_length_exceeded", issued.der, [mid.der], [top.cert], NOW, position="root")
    verify_chain(make_leaf(top).der, [], [top.cert], NOW)


def test_unknown_critical_extension(root: Issued) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    issued = make_leaf(root, "Odd", extra_extensions=[(odd, True)])
    _fails("cert_unknown_critical_extension", issued.der, [], [root.cert], NOW, position="leaf")
    tolerated = make_leaf(root, "Odd but optional", extra_extensions=[(odd, False)])
    verify_chain(tolerated.der, [], [root.cert], NOW)


# -- leaf usage --------------------------------------------------------------------------------


def test_leaf_without_digital_signature(root: Issued) -> None:
    enc = make_leaf(root, "Encipher Only", key_usage=("key_encipherment",))
    err = _fails("cert_key_usage_invalid", enc.der, [], [root.cert], NOW, position="leaf")
    assert "digital_signature" in err.message


def test_leaf_without_key_usage_extension(root: Issued) -> None:
    bare = make_leaf(root, "No KU", key_usage=None)
    _fails("cert_key_usage_invalid", bare.der, [], [root.cert], NOW)
    verify_chain(bare.der, [], [root.cert], NOW, required_key_usage=())


def test_leaf_with_wrong_eku(root: Issued) -> None:
    tls = make_leaf(root, "TLS Server", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    _fails(
        "cert_eku_invalid",
        tls.der,
        [],
        [root.cert],
        NOW,
        required_eku=CODE_SIGNING,
        position="leaf",
    )
    any_eku = make_leaf(root, "Anything", eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE])
    _fails("cert_eku_invalid", any_eku.der, [], [root.cert], NOW, required_eku=CODE_SIGNING)


def test_ca_certificate_as_leaf(root: Issued) -> None:
    sub_ca = make_ca("Sub CA", issuer=root, key_usage=("key_cert_sign", "digital_signature"))
    _fails("cert_key_usage_invalid", sub_ca.der, [], [root.cert], NOW, position="leaf")
    verify_chain(sub_ca.der, [], [root.cert], NOW, leaf_may_be_ca=True)


# -- algorithms --------------------------------------------------------------------------------


def test_small_rsa_key(root: Issued) -> None:
    small = make_leaf(root, "RSA 1024", key_type="rsa1024")
    _fails("cert_algorithm_unsupported", small.der, [], [root.cert], NOW, position="leaf")


def test_weak_signature_hash(root: Issued) -> None:
    ca = make_ca("RSA CA", key_type="rsa2048")
    sha224 = make_leaf(ca, "SHA-224 signed", hash_alg=hashes.SHA224())
    _fails("cert_algorithm_unsupported", sha224.der, [], [ca.cert], NOW, position="leaf")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_sha1_signature(tmp_path: Path) -> None:
    # cryptography refuses to create SHA-1 signatures, so the openssl command makes one.
    ca = make_ca("SHA-1 test CA")
    (tmp_path / "ca.key").write_bytes(ca.key_pem)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    (tmp_path / "ext.cnf").write_text(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    )
    run = functools.partial(subprocess.run, check=True, capture_output=True, cwd=tmp_path)
    run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=SHA-1 leaf",
        ]
    )
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-sha1",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-out",
            "leaf.pem",
        ]
    )
    (old,) = load_pem_certificates((tmp_path / "leaf.pem").read_bytes())
    assert old.signature_hash_algorithm is not None and old.signature_hash_algorithm.name == "sha1"
    when = old.not_valid_before_utc + DAY
    der = old.public_bytes(serialization.Encoding.DER)
    _fails("cert_algorithm_unsupported", der, [], [ca.cert], when, position="leaf")


def _with_serial_bytes(der: bytes, serial: bytes) -> bytes:
    # Rebuild the certificate with another serialNumber encoding (the signature then breaks,
    # but the serial must be refused before anything else looks at it).
    tbs_start = 4  # both SEQUENCE headers of these test certificates use 0x82 long lengths
    assert (
        der[0] == 0x30 and der[1] == 0x82 and der[tbs_start] == 0x30 and der[tbs_start + 1] == 0x82
    )
    off = tbs_start + 4
    assert der[off] == 0xA0
    off += 2 + der[off + 1]
    assert der[off] == 0x02
    old_len = der[off + 1]
    new = bytes([0x02, len(serial)]) + serial
    body = der[tbs_start + 4 : off] + new + der[off + 2 + old_len :]
    tbs_len = int.from_bytes(der[tbs_start + 2 : tbs_start + 4], "big") - (2 + old_len) + len(new)
    rest = der[tbs_start + 4 + int.from_bytes(der[tbs_start + 2 : tbs_start + 4], "big") :]
    tbs = b"\x30\x82" + tbs_len.to_bytes(2, "big") + body[:tbs_len]
    inner = tbs + rest
    return b"\x30\x82" + len(inner).to_bytes(2, "big") + inner


@pytest.mark.parametrize("serial", [b"\x80\x01", b"\xff", b"\x00"])
def test_non_positive_serial_is_malformed(root: Issued, leaf: Issued, serial: bytes) -> None:
    der = _with_serial_bytes(leaf.der, serial)
    err = _fails("cert_malformed", der, [], [root.cert], NOW, position="leaf")
    assert "serial" in err.message
    # The helper is faithful: with a positive serial the rebuilt certificate parses fine.
    _fails("cert_untrusted_issuer", _with_serial_bytes(leaf.der, b"\x01\x02"), [], [root.cert], NOW)
