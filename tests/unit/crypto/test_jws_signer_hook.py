"""Compact JWS signed through a signer hook (the HSM path) is the very token joserfc makes with
the key in memory; a hook whose signature does not verify never yields a token."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandboxsec import jose

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


class _Hook:
    """A signer that is not an ``Ed25519PrivateKey`` (as an HSM key is not)."""

    def __init__(self, key: Ed25519PrivateKey, *, corrupt: bool = False) -> None:
        self._key = key
        self._corrupt = corrupt
        self.calls = 0

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        sig = self._key.sign(data)
        return bytes([sig[0] ^ 1]) + sig[1:] if self._corrupt else sig

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()


def test_a_hooked_signature_is_the_in_memory_one() -> None:
    header = {"kid": "k1", "typ": "JWT", "alg": "none"}  # alg is always overwritten
    hook = _Hook(KEY)
    hooked = jose.sign_compact(header, b'{"a":1}', hook)
    assert hook.calls == 1
    assert hooked == jose.sign_compact(header, b'{"a":1}', KEY)  # Ed25519 is deterministic
    head, payload = jose.verify_compact(hooked, {"k1": KEY.public_key()}, max_chars=4096)
    assert head["alg"] == "EdDSA" and payload == b'{"a":1}'


def test_a_hook_whose_signature_does_not_verify_gives_no_token() -> None:
    with pytest.raises(jose.JwsError) as err:
        jose.sign_compact({"kid": "k1"}, b"{}", _Hook(KEY, corrupt=True))
    assert err.value.kind == "signature"


def test_a_hook_signing_with_another_key_than_it_publishes_gives_no_token() -> None:
    class _Liar(_Hook):
        def public_key(self) -> Ed25519PublicKey:
            return Ed25519PrivateKey.generate().public_key()

    with pytest.raises(jose.JwsError):
        jose.sign_compact({"kid": "k1"}, b"{}", _Liar(KEY))
