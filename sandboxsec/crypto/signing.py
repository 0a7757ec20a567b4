"""Ed25519 signers: a key in memory, or a key pair inside the HSM (PKCS#11 ``CKM_EDDSA``).

The audit checkpoint key, the grant-signing key and the attestation token key all sign
through :class:`Signer`, which :class:`~cryptography.hazmat.primitives.asymmetric.ed25519.
Ed25519PrivateKey` already is.  With the ``pkcs11`` key provider they are
:class:`HsmEd25519Signer` objects instead: the private key is generated inside the token
(``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``) and every signature is made there, so a copy of
the service's files or database holds no signing key.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sandboxsec.crypto.errors import KeyProviderUnavailableError
from sandboxsec.crypto.keys import KeyProvider, Pkcs11KeyProvider
from sandboxsec.signing import Signer

__all__ = ["HsmEd25519Signer", "HsmKeyFactory", "Signer", "hsm_key_factory", "hsm_signer"]

#: DER OID of Ed25519 (RFC 8410), as PKCS#11 ``CKA_EC_PARAMS`` wants it.
_ED25519_OID = "1.3.101.112"


class _UnpairedKeysError(KeyProviderUnavailableError):
    """Key halves under one label that do not make a pair (reason ``key_provider_unavailable``)."""


class HsmEd25519Signer:
    """An Ed25519 key pair labelled ``label`` in the provider's token, made on first use if
    ``create`` (else a missing key is :class:`KeyProviderUnavailableError`: a lost key must
    not be silently replaced by a new one)."""

    def __init__(self, provider: Pkcs11KeyProvider, label: str, *, create: bool = True) -> None:
        self._hsm = provider
        self.label = label
        self._create = create
        self._public: Ed25519PublicKey | None = None
        self._handle: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _find(self, session: Any) -> tuple[Any, Any] | None:
        """The (private, public) pair labelled :attr:`label`, None if there is none.

        Duplicates (made before key creation was locked, or by nodes on different hosts
        sharing one HSM) are resolved the same way in every process: the public keys in order
        of their point, each paired with the private key of the same ``CKA_ID``.
        """
        from pkcs11 import Attribute, KeyType, ObjectClass

        def objects(cls: ObjectClass) -> list[Any]:
            return list(session.get_objects({Attribute.CLASS: cls,
                                             Attribute.KEY_TYPE: KeyType.EC_EDWARDS,
                                             Attribute.LABEL: self.label}))

        privs, pubs = objects(ObjectClass.PRIVATE_KEY), objects(ObjectClass.PUBLIC_KEY)
        if not privs and not pubs:
            return None
        if len(privs) == 1 and len(pubs) == 1:
            return privs[0], pubs[0]
        for pub in sorted(pubs, key=lambda k: bytes(k[Attribute.EC_POINT])):
            ident = bytes(pub[Attribute.ID] or b"")
            match = [p for p in privs if ident and bytes(p[Attribute.ID] or b"") == ident]
            if len(match) == 1:
                return match[0], pub
        raise _UnpairedKeysError(
            f"the HSM holds {len(privs)} private and {len(pubs)} public keys labelled "
            f"{self.label!r} that cannot be paired; keep one complete pair"
        )

    def _pair(self, session: Any) -> tuple[Any, Any]:
        from pkcs11 import Attribute, KeyType, Mechanism
        from pkcs11.util.ec import encode_named_curve_parameters

        try:
            found = self._find(session)
        except _UnpairedKeysError:
            # Another process may be storing a new pair right now: the token shows one half
            # before the other.  It stores under the creation lock, so look again holding it;
            # halves that still do not pair then are a real fault.
            with self._hsm.creation_lock.held():
                found = self._find(session)
        if found is not None:
            return found
        if not self._create:
            # A session opened before the token went away finds nothing after it came back:
            # drop it, so the next call reconnects and finds the key again.
            missing = KeyProviderUnavailableError(
                f"the signing key {self.label!r} is missing from the HSM")
            self._hsm.unavailable(missing)
            raise missing
        with self._hsm.creation_lock.held():
            # Another process may have made it while this one waited for the lock.
            found = self._find(session)
            if found is not None:
                return found
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(_ED25519_OID)},
                local=True,
            )
            pub, priv = params.generate_keypair(
                store=True, label=self.label, id=os.urandom(16),  # pairs the two halves
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                  Attribute.TOKEN: True},
                public_template={Attribute.TOKEN: True},
            )
        return priv, pub

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism

        def op(session: Any) -> bytes:
            # The private key's handle is found once per session (two object searches per
            # signature cost more than the signature); a new session looks it up again.
            if self._handle is None or self._handle[0] is not session:
                self._handle = (session, self._pair(session)[0])
            sig: bytes = self._handle[1].sign(data, mechanism=Mechanism.EDDSA)
            return sig

        return self._hsm.run(op)

    def public_key(self) -> Ed25519PublicKey:
        from pkcs11 import Attribute

        with self._lock:
            if self._public is None:
                point = self._hsm.run(lambda s: bytes(self._pair(s)[1][Attribute.EC_POINT]))
                # CKA_EC_POINT is the DER OCTET STRING around the 32-byte point.
                raw = point[2:] if len(point) == 34 and point[0] == 0x04 else point
                self._public = Ed25519PublicKey.from_public_bytes(raw)
            return self._public


def hsm_signer(provider: KeyProvider, purpose: str) -> HsmEd25519Signer | None:
    """The HSM signer for ``purpose`` when the provider is an HSM, else None (file keys)."""
    if isinstance(provider, Pkcs11KeyProvider):
        return HsmEd25519Signer(provider, f"{provider.key_label}/{purpose}")
    return None


class HsmKeyFactory:
    """Makes and finds HSM signing keys by purpose or label (for keys recorded elsewhere,
    such as grant keys in the database)."""

    def __init__(self, provider: Pkcs11KeyProvider) -> None:
        self._hsm = provider

    def create(self, purpose: str) -> HsmEd25519Signer:
        """A new key pair for ``purpose`` (made on first use)."""
        return HsmEd25519Signer(self._hsm, f"{self._hsm.key_label}/{purpose}")

    def existing(self, label: str) -> HsmEd25519Signer:
        """The key pair ``label``; a missing one is an outage, never re-made."""
        return HsmEd25519Signer(self._hsm, label, create=False)


def hsm_key_factory(provider: KeyProvider) -> HsmKeyFactory | None:
    """The HSM key factory when the provider is an HSM, else None."""
    return HsmKeyFactory(provider) if isinstance(provider, Pkcs11KeyProvider) else None
