"""The chain verifier on real TPM endorsement key certificates made by swtpm's local CA,
and on random bytes (it answers a reason code, never crashes)."""

from __future__ import annotations

import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandboxsec.attestation.image_errors import CertificateChainError
from sandboxsec.attestation.x509chain import TCG_EK_CERTIFICATE, load_pem_certificates, verify_chain
from tests.support.pki import NOW, make_ca, make_leaf


class SwtpmPki:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root_pem = (base / "ca" / "swtpm-localca-rootca-cert.pem").read_bytes()
        self.issuer_pem = (base / "ca" / "issuercert.pem").read_bytes()
        self.ek_rsa = (base / "ek" / "ek-rsa2048.crt").read_bytes()
        self.ek_ecc = (base / "ek" / "ek-secp384r1.crt").read_bytes()


@pytest.fixture(scope="module")
def swtpm_pki(tmp_path_factory: pytest.TempPathFactory) -> SwtpmPki:
    if shutil.which("swtpm_setup") is None or shutil.which("swtpm_localca") is None:
        pytest.skip("swtpm_setup is not installed")
    base = tmp_path_factory.mktemp("swtpm-ek")
    for sub in ("state", "ca", "cfg", "ek"):
        (base / sub).mkdir()
    cfg = base / "cfg"
    (cfg / "localca.conf").write_text(
        f"statedir = {base / 'ca'}\n"
        f"signingkey = {base / 'ca' / 'signkey.pem'}\n"
        f"issuercert = {base / 'ca' / 'issuercert.pem'}\n"
        f"certserial = {base / 'ca' / 'certserial'}\n"
    )
    (cfg / "localca.options").write_text("--platform-manufacturer Test\n--platform-model QEMU\n")
    (cfg / "swtpm_setup.conf").write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {cfg / 'localca.conf'}\n"
        f"create_certs_tool_options = {cfg / 'localca.options'}\n"
    )
    subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(base / "state"),
            "--create-ek-cert",
            "--config",
            str(cfg / "swtpm_setup.conf"),
            "--write-ek-cert-files",
            str(base / "ek"),
            "--overwrite",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return SwtpmPki(base)


@pytest.mark.swtpm
def test_swtpm_ek_certificates_chain_to_the_local_ca(swtpm_pki: SwtpmPki) -> None:
    (root,) = load_pem_certificates(swtpm_pki.root_pem)
    (issuer,) = load_pem_certificates(swtpm_pki.issuer_pem)
    issuer_der = issuer.public_bytes(serialization.Encoding.DER)
    # The local CA stamps certificates with the real time of their creation.
    when = max(c.not_valid_before_utc for c in (root, issuer)) + timedelta(minutes=5)
    for ek, usage in ((swtpm_pki.ek_rsa, "key_encipherment"), (swtpm_pki.ek_ecc, "key_agreement")):
        chain = verify_chain(
            ek,
            [issuer_der],
            [root],
            when,
            required_key_usage=(usage,),  # type: ignore[arg-type]
            required_eku=TCG_EK_CERTIFICATE,
        )
        assert chain.root_subject == "CN=swtpm-localca-rootca"
        assert len(chain.path) == 3

    # An EK from the same TPM is refused when the manufacturer CA is not trusted.
    other = make_ca("Another TPM Manufacturer")
    with pytest.raises(CertificateChainError) as info:
        verify_chain(swtpm_pki.ek_rsa, [issuer_der], [other.cert], when, required_key_usage=())
    assert info.value.reason == "cert_untrusted_issuer"
    # ... and when the intermediate is withheld.
    with pytest.raises(CertificateChainError) as info:
        verify_chain(swtpm_pki.ek_rsa, [], [root], when, required_key_usage=())
    assert info.value.reason == "cert_untrusted_issuer"
    # ... and when a code-signing purpose is demanded of it.
    with pytest.raises(CertificateChainError) as info:
        verify_chain(
            swtpm_pki.ek_rsa, [issuer_der], [root], when, required_key_usage=("digital_signature",)
        )
    assert info.value.reason == "cert_key_usage_invalid"


_ROOT = make_ca("Fuzz Root")
_INTER = make_ca("Fuzz Issuing CA", issuer=_ROOT)
_LEAF = make_leaf(_INTER, "Fuzz Leaf")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.lists(st.binary(max_size=600), max_size=3))
def test_random_bytes_get_a_reason_code(leaf: bytes, inters: list[bytes]) -> None:
    with pytest.raises(CertificateChainError):
        verify_chain(leaf, inters, [_ROOT.cert], NOW)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_certificates_get_a_reason_code(data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["leaf", "inter"]))
    der = bytearray(_LEAF.der if which == "leaf" else _INTER.der)
    op = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(der) - 1))
    if op == "flip":
        der[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "truncate":
        del der[pos:]
    else:
        der[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    leaf, inter = (bytes(der), _INTER.der) if which == "leaf" else (_LEAF.der, bytes(der))
    try:
        verify_chain(leaf, [inter], [_ROOT.cert], NOW)
    except CertificateChainError:
        return
    pytest.fail(f"a {op} at byte {pos} of the {which} certificate still verified")
