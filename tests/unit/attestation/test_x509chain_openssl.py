"""Differential test: our chain verifier against OpenSSL's X509_STORE (through pyOpenSSL).

A corpus of chains is generated here (root, intermediate, leaf; each mutated in the ways
RFC 5280 path validation cares about, singly and in pairs).  For every chain both verifiers
say accept or refuse; every disagreement must be one of :data:`DELIBERATE`, each a
documented strictness of ours.  Anything else is a bug on one side.

Only path validation is compared: the leaf's own key usage and EKU are a profile question
(publisher, EK) OpenSSL is not asked here, so they are relaxed on our side.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import pytest
from cryptography import x509

from sandboxsec.attestation.image_errors import CertificateChainError
from sandboxsec.attestation.x509chain import verify_chain
from tests.support.pki import DAY, NOW, make_ca, make_leaf

OpenSSL = pytest.importorskip("OpenSSL.crypto")

_UNKNOWN = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.9"), b"\x05\x00")
_EK_SAN = x509.SubjectAlternativeName([x509.DirectoryName(x509.Name([
    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:53575450"),
    x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "swtpm"),
]))])

#: Mutations by name: (position, keyword overrides for make_ca / make_leaf).
MUTATIONS: dict[str, tuple[str, dict[str, object]]] = {
    "leaf_expired": ("leaf", {"not_after": NOW - DAY}),
    "leaf_not_yet_valid": ("leaf", {"not_before": NOW + DAY}),
    "leaf_rsa1024": ("leaf", {"key_type": "rsa1024"}),
    "leaf_unknown_critical": ("leaf", {"extra_extensions": [(_UNKNOWN, True)]}),
    "leaf_unknown_noncritical": ("leaf", {"extra_extensions": [(_UNKNOWN, False)]}),
    "leaf_ek_san_critical": ("leaf", {"extra_extensions": [(_EK_SAN, True)]}),
    "leaf_forged_signature": ("leaf", {"forge": True}),
    "leaf_ed25519_key": ("leaf", {"key_type": "ed25519"}),
    "leaf_p384": ("leaf", {"key_type": "p384"}),
    "inter_expired": ("inter", {"not_after": NOW - DAY}),
    "inter_not_ca": ("inter", {"ca": False}),
    "inter_no_basic_constraints": ("inter", {"ca": None}),
    "inter_no_key_usage": ("inter", {"key_usage": None}),
    "inter_no_key_cert_sign": ("inter", {"key_usage": ("crl_sign",)}),
    "inter_unknown_critical": ("inter", {"extra_extensions": [(_UNKNOWN, True)]}),
    "inter_rsa2048": ("inter", {"key_type": "rsa2048"}),
    "inter_pathlen_0_below_second_ca": ("inter", {"path_length": 0, "second": True}),
    "root_expired": ("root", {"not_after": NOW - DAY}),
    "root_pathlen_0": ("root", {"path_length": 0}),
    "missing_intermediate": ("inter", {"omit": True}),
}

#: Disagreements that are our deliberate strictness (accepted by OpenSSL, refused by us) or
#: OpenSSL's (refused by OpenSSL, accepted by us), with why.
DELIBERATE: dict[str, str] = {
    "leaf_rsa1024": "ours refuses RSA keys under 2048 bits anywhere on the path (NIST SP "
                    "800-131A); OpenSSL at this build's security level takes a 1024-bit leaf",
}


@dataclass
class Chain:
    leaf: x509.Certificate
    intermediates: list[x509.Certificate]
    root: x509.Certificate
    now: datetime


def _build(mutations: tuple[str, ...]) -> Chain:
    over: dict[str, dict[str, object]] = {"root": {}, "inter": {}, "leaf": {}}
    for name in mutations:
        position, kwargs = MUTATIONS[name]
        over[position].update(kwargs)
    root_kw = dict(over["root"])
    root = make_ca("Diff Root", **root_kw)  # type: ignore[arg-type]
    inter_kw = dict(over["inter"])
    omit = bool(inter_kw.pop("omit", False))
    second = bool(inter_kw.pop("second", False))
    inter = make_ca("Diff Issuing", issuer=root, **inter_kw)  # type: ignore[arg-type]
    issuer, chain = inter, [inter.cert]
    if second:
        issuer = make_ca("Diff Second Issuing", issuer=inter)
        chain.append(issuer.cert)
    leaf_kw = dict(over["leaf"])
    forge = bool(leaf_kw.pop("forge", False))
    if forge:
        leaf_kw["signer_key"] = make_ca("Diff Forger").key
    leaf = make_leaf(issuer, "Diff Leaf", **leaf_kw)  # type: ignore[arg-type]
    return Chain(leaf.cert, [] if omit else chain, root.cert, NOW)


def _ours(chain: Chain) -> bool:
    from cryptography.hazmat.primitives import serialization

    der = serialization.Encoding.DER
    try:
        verify_chain(chain.leaf.public_bytes(der),
                     [c.public_bytes(der) for c in chain.intermediates], [chain.root], chain.now,
                     required_key_usage=(), required_eku=None, leaf_may_be_ca=True)
    except CertificateChainError:
        return False
    return True


def _openssl(chain: Chain) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pyOpenSSL's X509 is deprecated
        store = OpenSSL.X509Store()
        store.add_cert(OpenSSL.X509.from_cryptography(chain.root))
        store.set_time(chain.now)
        ctx = OpenSSL.X509StoreContext(
            store, OpenSSL.X509.from_cryptography(chain.leaf),
            chain=[OpenSSL.X509.from_cryptography(c) for c in chain.intermediates],
        )
        try:
            ctx.verify_certificate()
        except OpenSSL.X509StoreContextError:
            return False
    return True


def _corpus() -> list[tuple[str, ...]]:
    singles = [(name,) for name in MUTATIONS]
    pairs = [
        p for p in itertools.combinations(sorted(MUTATIONS), 2)
        if len({MUTATIONS[n][0] for n in p}) == 2  # one mutation each on two certificates
    ]
    # Every single mutation, the unmutated chain, and a deterministic sample of pairs.
    return [(), *singles, *pairs[::7]]


@pytest.mark.parametrize("mutations", _corpus(), ids=lambda m: "+".join(m) or "valid")
def test_same_verdict_as_openssl(mutations: tuple[str, ...]) -> None:
    chain = _build(mutations)
    ours, theirs = _ours(chain), _openssl(chain)
    key = "+".join(mutations)
    if ours != theirs:
        assert any(m in DELIBERATE for m in mutations), (
            f"{key or 'valid'}: ours={'accept' if ours else 'refuse'} "
            f"openssl={'accept' if theirs else 'refuse'}: a bug or an undocumented strictness"
        )


def test_the_corpus_exercises_both_outcomes() -> None:
    outcomes: Callable[[tuple[str, ...]], bool] = lambda m: _ours(_build(m))  # noqa: E731
    assert outcomes(()) and not outcomes(("leaf_expired",))
