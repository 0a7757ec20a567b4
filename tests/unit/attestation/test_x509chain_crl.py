"""CRL correctness: a CRL is used only when it is current, complete, signed by an issuer
allowed to sign CRLs, with an allowed algorithm.  (The same classes against the vTPM's EK
chain are in ``tests/integration/attestation/test_hardening_swtpm.py``.)"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from sandboxsec.attestation.image_errors import CertificateChainError
from sandboxsec.attestation.x509chain import verify_chain
from tests.support.pki import DAY, NOW, Issued, make_ca, make_crl, make_leaf


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca("CRL Root CA")


@pytest.fixture(scope="module")
def inter(root: Issued) -> Issued:
    return make_ca("CRL Issuing CA", issuer=root)


@pytest.fixture(scope="module")
def leaf(inter: Issued) -> Issued:
    return make_leaf(inter, "CRL Publisher")


def _code(leaf: Issued, inter: Issued, root: Issued, crl: x509.CertificateRevocationList) -> str:
    with pytest.raises(CertificateChainError) as info:
        verify_chain(leaf.der, [inter.der], [root.cert], NOW, crls=[crl])
    return info.value.reason


def _idp(**over: object) -> x509.IssuingDistributionPoint:
    args: dict[str, object] = dict(
        full_name=None, relative_name=None, only_contains_user_certs=False,
        only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
        only_contains_attribute_certs=False,
    )
    args.update(over)
    return x509.IssuingDistributionPoint(**args)  # type: ignore[arg-type]


def test_a_good_crl_that_does_not_list_the_leaf_passes(root: Issued, inter: Issued,
                                                        leaf: Issued) -> None:
    crl = make_crl(inter, [12345])
    chain = verify_chain(leaf.der, [inter.der], [root.cert], NOW, crls=[crl])
    # The result may be cached only until the CRL's nextUpdate.
    assert chain.valid_until == crl.next_update_utc


def test_future_this_update(root: Issued, inter: Issued, leaf: Issued) -> None:
    crl = make_crl(inter, [], this_update=NOW + DAY, next_update=NOW + 8 * DAY)
    assert _code(leaf, inter, root, crl) == "cert_crl_not_yet_valid"


@pytest.mark.parametrize("critical", [True, False])
@pytest.mark.parametrize("scope", [
    {"only_contains_ca_certs": True},
    {"only_contains_user_certs": True},
    {"only_some_reasons": frozenset({x509.ReasonFlags.key_compromise})},
])
def test_partial_crl_is_not_complete(root: Issued, inter: Issued, leaf: Issued,
                                     scope: dict[str, object], critical: bool) -> None:
    crl = make_crl(inter, [], extensions=[(_idp(**scope), critical)])
    assert _code(leaf, inter, root, crl) == "cert_crl_scope_unsupported"


def test_delta_crl_is_not_complete(root: Issued, inter: Issued, leaf: Issued) -> None:
    crl = make_crl(inter, [], extensions=[(x509.DeltaCRLIndicator(5), True)])
    assert _code(leaf, inter, root, crl) == "cert_crl_scope_unsupported"


def test_unknown_critical_crl_extension(root: Issued, inter: Issued, leaf: Issued) -> None:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    crl = make_crl(inter, [], extensions=[(ext, True)])
    assert _code(leaf, inter, root, crl) == "cert_crl_scope_unsupported"


def test_issuer_without_crl_sign(root: Issued) -> None:
    signer_only = make_ca("No cRLSign CA", issuer=root, key_usage=("key_cert_sign",))
    leaf = make_leaf(signer_only, "Under No cRLSign")
    crl = make_crl(signer_only, [leaf.cert.serial_number])
    assert _code(leaf, signer_only, root, crl) == "cert_crl_issuer_not_crl_signer"


def test_weak_crl_signature_algorithm(root: Issued, inter: Issued, leaf: Issued) -> None:
    crl = make_crl(inter, [], hash_alg=hashes.SHA224())
    assert _code(leaf, inter, root, crl) == "cert_crl_algorithm_unsupported"


def test_a_revoking_crl_still_revokes(root: Issued, inter: Issued, leaf: Issued) -> None:
    crl = make_crl(inter, [leaf.cert.serial_number])
    assert _code(leaf, inter, root, crl) == "cert_revoked"
