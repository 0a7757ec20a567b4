"""What signs checkpoints, grants and attestation tokens: an Ed25519 key in memory, or a key
pair inside the HSM (:mod:`sandboxsec.crypto.signing`).  A Protocol only, so every layer can
name it without importing the key provider."""

from __future__ import annotations

from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["Signer"]


class Signer(Protocol):
    """Signs with Ed25519 (:class:`Ed25519PrivateKey` is one)."""

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of ``data``."""
        ...

    def public_key(self) -> Ed25519PublicKey:
        """The public half, to publish and verify with."""
        ...
