"""MakeCredential in Python: KDFs against pyca's own, and a software ActivateCredential."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxsec.attestation import akbind
from sandboxsec.attestation.errors import AkActivationFailedError, EkCertificateKeyMismatchError
from tests.support.pki import make_ca, make_leaf
from tests.support.softtpm import SoftAk, soft_activate

EK_EKU = "2.23.133.8.1"


@settings(max_examples=50, deadline=None)
@given(
    key=st.binary(min_size=1, max_size=64),
    label=st.binary(min_size=1, max_size=16).filter(lambda b: b"\x00" not in b),
    u=st.binary(max_size=40),
    v=st.binary(max_size=40),
    bits=st.sampled_from([128, 256, 384]),
)
def test_kdfa_is_sp800_108_counter_mode(
    key: bytes, label: bytes, u: bytes, v: bytes, bits: int
) -> None:
    ref = KBKDFHMAC(
        algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
        location=CounterLocation.BeforeFixed, label=label, context=u + v, fixed=None,
    ).derive(key)
    assert akbind.kdfa("sha256", key, label, u, v, bits) == ref


@settings(max_examples=50, deadline=None)
@given(z=st.binary(min_size=32, max_size=48), u=st.binary(max_size=48), v=st.binary(max_size=48))
def test_kdfe_is_concat_kdf(z: bytes, u: bytes, v: bytes) -> None:
    ref = ConcatKDFHash(hashes.SHA384(), 48, otherinfo=b"IDENTITY\x00" + u + v).derive(z)
    assert akbind.kdfe("sha384", z, b"IDENTITY", u, v, 384) == ref


def _ek(key_type: str) -> tuple[object, object]:
    from cryptography import x509

    ca = make_ca("Test TPM Manufacturer CA", key_type="p256")
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(65537, 2048)
        usage = ("key_encipherment",)
    else:
        key = ec.generate_private_key(ec.SECP384R1() if key_type == "p384" else ec.SECP256R1())
        usage = ("key_agreement",)
    leaf = make_leaf(ca, "Test EK", key=key, key_usage=usage, eku=(x509.ObjectIdentifier(EK_EKU),))
    return key, leaf.cert


@pytest.mark.parametrize(
    ("key_type", "name_alg", "bits"), [("rsa", "sha256", 128), ("p256", "sha256", 128),
                                       ("p384", "sha384", 256)]
)
def test_credential_round_trip(key_type: str, name_alg: str, bits: int) -> None:
    ek_key, cert = _ek(key_type)
    profile = akbind.ek_profile(cert)  # type: ignore[arg-type]
    assert (profile.name_alg, profile.sym_bits) == (name_alg, bits)
    ak = SoftAk()
    secret = b"s" * 32
    cred = akbind.make_credential(profile, ak.name, secret)
    got = soft_activate(ek_key, ak.name, cred.credential_blob, cred.encrypted_secret,  # type: ignore[arg-type]
                        name_alg=name_alg, sym_bits=bits)
    assert got == secret
    # The credential is bound to the AK's name: another AK cannot activate it.
    with pytest.raises(ValueError, match="integrity"):
        soft_activate(ek_key, SoftAk().name, cred.credential_blob, cred.encrypted_secret,  # type: ignore[arg-type]
                      name_alg=name_alg, sym_bits=bits)
    akbind.check_activation(hashlib.sha256(secret).digest(), got)
    with pytest.raises(AkActivationFailedError):
        akbind.check_activation(hashlib.sha256(secret).digest(), b"t" * 32)


def test_ek_public_must_hold_the_certified_key() -> None:
    from tpm2_pytss.types import TPM2B_PUBLIC

    _, cert = _ek("rsa")
    other = TPM2B_PUBLIC.parse("rsa2048:aes128cfb")
    other.publicArea.unique.rsa = b"\x01" * 256
    with pytest.raises(EkCertificateKeyMismatchError):
        akbind.ek_profile(cert, other.marshal())  # type: ignore[arg-type]
