"""One signed certificate must have exactly one accepted encoding.

Found by the mutation fuzzer: flipping the low bit of the signature BIT STRING's unused-bits
byte gave a certificate whose signature still verified but whose SHA-256 differed, so a
revocation by fingerprint (``cert-sha256:``) could be sidestepped.
"""

from __future__ import annotations

import hashlib

import pytest

from sandboxsec.attestation.image_errors import CertificateChainError
from sandboxsec.attestation.x509chain import verify_chain
from tests.support.pki import NOW, make_ca, make_leaf


def _signature_padding_variant(der: bytes, signature: bytes) -> bytes:
    out = bytearray(der)
    index = len(der) - len(signature) - 1
    assert out[index] == 0  # the unused-bits byte of the signature BIT STRING
    out[index] = 1 if signature[-1] & 1 == 0 else 0  # declares a padding bit that is zero
    return bytes(out)


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_signature_with_declared_unused_bits_is_refused(key_type: str) -> None:
    root = make_ca("Encoding Root")
    inter = make_ca("Encoding CA", issuer=root)
    for _ in range(20):  # find a signature whose last bit is 0, so the variant parses
        leaf = make_leaf(inter, "Encoding Leaf", key_type=key_type)
        if leaf.cert.signature[-1] & 1 == 0:
            break
    else:
        pytest.skip("no signature ending in a zero bit drawn")
    verify_chain(leaf.der, [inter.der], [root.cert], NOW)
    variant = _signature_padding_variant(leaf.der, leaf.cert.signature)
    assert hashlib.sha256(variant).digest() != hashlib.sha256(leaf.der).digest()
    with pytest.raises(CertificateChainError) as info:
        verify_chain(variant, [inter.der], [root.cert], NOW)
    assert info.value.reason == "cert_malformed"


def test_trailing_bytes_are_refused() -> None:
    root = make_ca("Encoding Root")
    leaf = make_leaf(make_ca("Encoding CA", issuer=root), "Encoding Leaf")
    with pytest.raises(CertificateChainError) as info:
        verify_chain(leaf.der + b"\x00", [], [root.cert], NOW)
    assert info.value.reason == "cert_malformed"
