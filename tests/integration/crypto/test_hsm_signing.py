"""With the PKCS#11 provider the audit checkpoint, grant and attestation token keys are
Ed25519 key pairs inside the HSM (SoftHSM2): signatures verify with the published public keys,
and the private keys are sensitive and not extractable; no private key is on disk or in the
database."""

from __future__ import annotations

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass
from sqlmodel import select

from sandboxsec.audit.checkpoint import verify_signed_checkpoint
from sandboxsec.crypto.errors import KeyProviderUnavailableError
from sandboxsec.crypto.keys import Pkcs11KeyProvider
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.policy.grants import decode_grant
from sandboxsec.policy.models import GrantSigningKey
from sandboxsec.principal import Principal, Role
from sandboxsec.services import Services
from tests.conftest import TenantKeys, make_session
from tests.integration.crypto.conftest import SOFTHSM_MODULE, SoftHsm

pytestmark = pytest.mark.softhsm


@pytest.fixture
def services(hsm_services: Services) -> Services:
    """Services whose root key is a fresh key in the SoftHSM2 token."""
    return hsm_services


def _assert_private_key_stays_inside(softhsm: SoftHsm, label: str) -> None:
    lib = pkcs11.lib(SOFTHSM_MODULE)
    with lib.get_token(token_label=softhsm.label).open() as session:
        key = session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                              key_type=KeyType.EC_EDWARDS, label=label)
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.PKCS11Error):
            _ = key[Attribute.VALUE]


def test_audit_checkpoints_are_signed_inside_the_hsm(services: Services, tenant: TenantKeys,
                                                     softhsm: SoftHsm) -> None:
    cp = services.audit.checkpoint_now(tenant.id)
    signer = services.audit.keys.signing_key
    assert isinstance(signer, HsmEd25519Signer)
    checked = verify_signed_checkpoint(cp.note, services.audit.keys.public_key,
                                       name=services.audit.keys.key_name)
    assert checked.size == cp.size
    # The PEM an auditor gets is the HSM key's public half.
    assert "BEGIN PUBLIC KEY" in services.audit.keys.public_pem()
    assert not (services.settings.home / "audit" / "signing_key.pem").exists()
    _assert_private_key_stays_inside(softhsm, signer.label)


def test_grants_are_signed_inside_the_hsm(services: Services, tenant: TenantKeys,
                                          softhsm: SoftHsm) -> None:
    sid = make_session(services, tenant)
    agent = Principal(tenant.id, tenant.key_ids["agent"], Role.AGENT)
    result = services.policy.request_action(agent, session_id=sid, action="message",
                                            resource="chat", params={"text": "hi"})
    assert result.grant is not None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    published = {k: Ed25519PublicKey.from_public_bytes(v)
                 for k, v in services.policy.public_keys().items()}
    claims = decode_grant(result.grant, published)
    assert claims.session_id == sid
    with services.db.session() as s:
        rows = s.exec(select(GrantSigningKey)).all()
    assert len(rows) == 1 and rows[0].private_key == b""
    label = rows[0].provider_id.removeprefix("pkcs11-object:")
    _assert_private_key_stays_inside(softhsm, label)
    # A lost HSM key is not silently replaced: signing fails closed.
    gone = HsmEd25519Signer(services.keys, label + "-missing", create=False)  # type: ignore[arg-type]
    with pytest.raises(KeyProviderUnavailableError):
        gone.sign(b"x")


def test_attestation_tokens_are_signed_inside_the_hsm(services: Services,
                                                      softhsm: SoftHsm) -> None:
    signer = services.attestation._key()
    assert isinstance(signer, HsmEd25519Signer)
    sig = signer.sign(b"token body")
    signer.public_key().verify(sig, b"token body")
    assert not any(p.name.endswith(".pem") for p in services.settings.home.rglob("*"))
    _assert_private_key_stays_inside(softhsm, signer.label)
    assert isinstance(services.keys, Pkcs11KeyProvider)
