"""With the PKCS#11 provider the audit checkpoint key is an Ed25519 key pair inside the HSM
(SoftHSM2): checkpoints verify with the published public key, and the private key is sensitive
and not extractable; no checkpoint key is on disk."""

from __future__ import annotations

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from sandboxsec.audit.checkpoint import verify_signed_checkpoint
from sandboxsec.crypto.signing import HsmEd25519Signer
from sandboxsec.services import Services
from tests.conftest import TenantKeys
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
