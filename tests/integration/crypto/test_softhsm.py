"""The same guarantees with the root key inside an HSM (SoftHSM2 through PKCS#11)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType

from sandboxsec.clock import FixedClock
from sandboxsec.crypto.errors import KeyProviderUnavailableError, TenantKeysShreddedError
from sandboxsec.crypto.keys import Pkcs11KeyProvider
from sandboxsec.principal import Role
from sandboxsec.services import Services
from sandboxsec.settings import Settings
from sandboxsec.storage.db import Database
from tests.conftest import TenantKeys
from tests.integration.crypto.conftest import SMALL, SOFTHSM_MODULE, SoftHsm, principal
from tests.integration.crypto.test_trajectory import MakeSession

pytestmark = pytest.mark.softhsm


@pytest.fixture
def services(settings: Settings, database: Database, clock: FixedClock,
             softhsm: SoftHsm) -> Iterator[Services]:
    """Services whose root key is a fresh key in the SoftHSM2 token."""
    hsm = settings.model_copy(update={
        **SMALL, "key_provider": "pkcs11", "pkcs11_module": SOFTHSM_MODULE,
        "pkcs11_token_label": softhsm.label, "pkcs11_pin": softhsm.pin,
        "pkcs11_key_label": f"root-{secrets.token_hex(6)}",
    })
    svc = Services(hsm, clock=clock, db=database)
    yield svc
    svc.close()


def test_round_trip_rotation_and_shredding(services: Services, tenant: TenantKeys,
                                           make_session: MakeSession) -> None:
    assert isinstance(services.keys, Pkcs11KeyProvider)
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    small = services.trajectory.write(agent, sid, "action", b"hsm protected")
    big = services.trajectory.write(agent, sid, "screenshot", b"\x89PNG" * 3000)
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(admin, sid, small.record_id).data == b"hsm protected"
    services.key_admin.rotate(tenant.id, admin, rewrap=True)
    services.key_hierarchy.forget_keys()
    assert services.trajectory.read(admin, sid, big.record_id).data == b"\x89PNG" * 3000
    status = services.key_admin.status(tenant.id)
    assert status.versions[0].provider_id.startswith("pkcs11:")
    assert [(v.version, v.data_keys) for v in status.versions] == [(1, 0), (2, 1)]
    services.key_admin.shred_tenant(tenant.id, admin)
    with pytest.raises(TenantKeysShreddedError):
        services.trajectory.read(admin, sid, small.record_id)


def test_root_key_never_leaves_the_hsm(services: Services, tenant: TenantKeys,
                                       make_session: MakeSession, softhsm: SoftHsm) -> None:
    services.trajectory.write(principal(tenant, Role.AGENT), make_session(tenant.id),
                              "action", b"x")
    lib = pkcs11.lib(SOFTHSM_MODULE)
    # The provider's session already logged this process in to the token.
    with lib.get_token(token_label=softhsm.label).open() as session:
        key = session.get_key(label=services.settings.pkcs11_key_label, key_type=KeyType.AES)
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.PKCS11Error):
            _ = key[Attribute.VALUE]


def test_token_removed_fails_closed_then_recovers(services: Services, tenant: TenantKeys,
                                                  make_session: MakeSession,
                                                  softhsm: SoftHsm) -> None:
    agent, admin = principal(tenant, Role.AGENT), principal(tenant, Role.ADMIN)
    sid = make_session(tenant.id)
    rec = services.trajectory.write(agent, sid, "action", b"before the outage")
    softhsm.remove_token()
    try:
        services.key_hierarchy.forget_keys()
        with pytest.raises(KeyProviderUnavailableError) as err:
            services.trajectory.read(admin, sid, rec.record_id)
        assert (err.value.reason, err.value.status) == ("key_provider_unavailable", 503)
        with pytest.raises(KeyProviderUnavailableError):
            services.trajectory.write(agent, make_session(tenant.id), "action", b"new")
        with pytest.raises(KeyProviderUnavailableError):
            services.key_admin.rotate(tenant.id, admin)
    finally:
        softhsm.restore_token()
    assert services.trajectory.read(admin, sid, rec.record_id).data == b"before the outage"
    assert services.key_admin.status(tenant.id).current_version == 1


def test_wrong_pin_or_token_is_unavailable(softhsm: SoftHsm) -> None:
    for provider in (
        Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, "00000000", "k"),
        Pkcs11KeyProvider(SOFTHSM_MODULE, "no-such-token", softhsm.pin, "k"),
    ):
        with pytest.raises(KeyProviderUnavailableError):
            provider.wrap(b"k" * 32, b"aad")
        provider.close()


def test_hsm_wrap_binds_aad(softhsm: SoftHsm) -> None:
    from sandboxsec.crypto.errors import DecryptionFailedError

    provider = Pkcs11KeyProvider(SOFTHSM_MODULE, softhsm.label, softhsm.pin,
                                 f"root-{secrets.token_hex(6)}")
    try:
        assert not provider.has_root_key()
        wrapped = provider.wrap(b"k" * 32, b"tenant a v1")
        assert provider.has_root_key()
        assert b"k" * 32 not in wrapped
        assert provider.unwrap(wrapped, b"tenant a v1") == b"k" * 32
        with pytest.raises(DecryptionFailedError):
            provider.unwrap(wrapped, b"tenant b v1")
        with pytest.raises(DecryptionFailedError):
            provider.unwrap(wrapped[:-1] + bytes([wrapped[-1] ^ 1]), b"tenant a v1")
    finally:
        provider.close()
